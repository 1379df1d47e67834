"""Callbacks for any Lightning fit: ``NoiseScaleMonitor`` logs the gradient noise scale as training goes, and
``BatchSizeWarmup`` grows the batch size by it (or by a fixed schedule). See docs/callbacks.md.

    from batchlab.callbacks import BatchSizeWarmup, NoiseScaleMonitor
    Trainer(callbacks=[NoiseScaleMonitor(), BatchSizeWarmup()])
"""

from batchlab.callbacks.noise_monitor import NoiseReading, NoiseScaleMonitor
from batchlab.callbacks.warmup import BatchSizeChange, BatchSizeWarmup

__all__ = ["BatchSizeChange", "BatchSizeWarmup", "NoiseReading", "NoiseScaleMonitor"]
