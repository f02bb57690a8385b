"""One module per verb: a config dataclass and `run(cfg, resume) -> summary dict`."""
