"""batchlab: which batch size should I train with, and what does it cost me?

Modules: ``data`` (the toy regression DataModule and fast tensor batching), ``model`` (the MLP LightningModule),
``summary`` (end-of-run reporting callbacks), ``cli`` (the ``batchlab`` command), ``notebook`` (the seed
notebook's plain-PyTorch loop, the reference for parity tests and benchmarks).
"""

__version__ = "0.1.0"
