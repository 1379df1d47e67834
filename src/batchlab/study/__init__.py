"""The batch-size study: which batch size reaches a target loss soonest, measured.

    batchlab study -c configs/study.yaml            # the full study (about 2 minutes on 2 CPU cores)
    batchlab study -c configs/study.yaml --quick    # seconds: noise scale and throughput only

    from batchlab import run_study                  # the same from Python
    result = run_study(model, datamodule, target=1.05, accelerator="cpu", out="studies/x")

For every batch size B of a grid it measures

1. throughput: the steady-state time per optimizer step t(B) of a real Lightning fit, fitted by alpha + beta B;
2. steps to target: from the same initial weights, at a few learning rates centred by a scaling rule, the
   optimizer steps until the monitored validation metric reaches the target (the best LR per B is kept);
3. the gradient noise scale B_simple along a reference run (``batchlab.scaling``),

then fits S(B) = S_min (1 + B_crit / B) and recommends the B with the least measured time to target,
T(B) = S(B) t(B). It works with any LightningModule and LightningDataModule whose batch size is a ``batch_size``
attribute or hparam (the batch-size finder's contract) and whose learning rate is an ``lr`` or ``learning_rate``
attribute or hparam (the LR finder's contract), and whose model logs the monitored metric.

Every finished measurement is written at once, atomically, into the study's folder; rerunning the same command
skips what is done. The report (CSV, JSON, Markdown, plots, TensorBoard runs) is written from the result.

Under Lightning's DDP (``--trainer.strategy ddp --trainer.devices N``, or torchrun/SLURM) every rank runs this same
study, one fit after another, in step: B is the global batch (B / world size per rank), every measurement is rank
0's, broadcast to all ranks so that all take the same decisions, and rank 0 alone writes. The noise scale then
comes from the ranks' own gradients (B_small = one rank's batch, B_big = the global batch).

Modules, in the order a study uses them: ``settings`` (the options), ``runner`` (``Study``, ``run_study``),
``ranks`` (rank 0 decides), ``folder`` (the resumable folder), ``fitting`` (the one fit every measurement makes),
``grid``, ``throughput``, ``noise``, ``sweep`` (the measurements), ``recommendation`` (fits and answer),
``results`` (the dataclasses), ``report`` (what is written and printed), ``answer`` (its words), ``plots`` and
``plot_axes`` (the figures), ``board`` (the TensorBoard runs).
"""

from __future__ import annotations

import importlib
from typing import Any

# What the package offers, by the module that holds it: imported on first use, so that the command line's parser,
# which reads StudySettings alone, does not import the study itself.
_EXPORTS = {
    "StudySettings": "settings", "Study": "runner", "run_study": "runner", "format_study": "report",
    "write_report": "report", **{name: "results" for name in (
        "BatchSizeResult", "CurvePoint", "NoisePoint", "NoiseScale", "StepTiming", "StudyResult", "Throughput",
        "Trial")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
