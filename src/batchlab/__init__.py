"""batchlab: which batch size should I train with, and what does it cost me?

Modules: ``data`` (the toy regression DataModule and fast tensor batching), ``model`` (the MLP LightningModule),
``summary`` (end-of-run reporting callbacks), ``study`` (the batch-size study), ``cli`` (the ``batchlab``
command), ``notebook`` (the seed notebook's plain-PyTorch loop, the reference for parity tests and benchmarks).

From Python: ``batchlab.run_study(model, datamodule, target=..., ...)`` runs a study as ``batchlab study`` does.
"""

import importlib

__version__ = "0.1.0"

# The Python API, by the module that holds it: imported on first use, so that ``import batchlab`` stays cheap.
_API = {"run_study": "batchlab.study"}


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
