"""honelm: train small language models end to end and make their fine-tuning better, honestly.

The package owns one training loop (`honelm.loop.fit`), objectives as small functions
(`honelm.objectives`), boosters wired in one place (`honelm.boosters`), and a strict data
protocol (`honelm.data`, `honelm.protocol`). The `honelm` command (`honelm.cli`) maps verbs to
stages (`honelm.stages`).
"""

__version__ = "0.1.0"
