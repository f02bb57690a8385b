"""`python -m tests.killrun STEP VERB ARGS...`: `honelm VERB ARGS...`, SIGKILLed right after optimizer step STEP.

A process that gets no chance to clean up (the OOM killer, a lost machine) must still resume bit
for bit from its last checkpoint; the kill-and-resume tests run the real CLI through this.
"""

from __future__ import annotations

import os
import signal
import sys

from honelm.cli import main
from honelm.loop import Callback, TrainState


class KillAt(Callback):
    """SIGKILL this process after optimizer step `step` (its `train` event, if one was due, is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, state: TrainState) -> None:
        if state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:], callbacks=[KillAt(int(sys.argv[1]))]))
