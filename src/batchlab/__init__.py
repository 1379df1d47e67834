"""batchlab: which batch size should I train with, and what does it cost me?

Modules: ``data`` (the toy regression DataModule and fast tensor batching), ``model`` (the MLP LightningModule),
``summary`` (end-of-run reporting callbacks), ``tune`` (Lightning's batch-size finder, made honest), ``study`` (the
batch-size study), ``cli`` (the ``batchlab`` command), ``notebook`` (the seed notebook's plain-PyTorch loop, the
reference for parity tests and benchmarks).

The Python API is importable from here, each name loaded from its module on first use (``import batchlab`` stays
cheap: no Lightning until one is asked for)::

    from batchlab import find_batch_size, run_study
    found = find_batch_size(model, datamodule, mode="binsearch", max_val=4096, accelerator="cpu")
    result = run_study(model, datamodule, target=1.05, quick=True, out="studies/mine")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Name -> the module that defines it.
_API = {
    "find_batch_size": "batchlab.tune",
    "run_study": "batchlab.study",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'batchlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
