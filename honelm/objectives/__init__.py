"""Objectives: each turns a batch into a loss; the loop never knows which stage it serves.

The contract (DESIGN.md section 3): `objective(model, batch) -> Loss`. `Loss.value` is the SUM
of per-unit losses in the micro-batch (units: target tokens for language modelling, examples for
classification) and `units(batch)` counts them without running the model, so the loop can divide
by the unit count of the whole optimizer step: exact gradient accumulation on variable-length
data. `step()` is the per-micro-batch forward+backward; boosters that need several passes
(adversarial ascent) override it so peak memory stays flat in the number of passes.
"""

from honelm.objectives.base import Loss, Objective

__all__ = ["Loss", "Objective"]
