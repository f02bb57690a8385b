"""Protocol: what a finished run owes its reader — the run report (`report.py`) built only from the
files a training run leaves behind, so the evidence for a result can be checked without re-running it."""
