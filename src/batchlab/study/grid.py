"""Which batch sizes a study measures: the training set's size, the largest batch that fits in device memory (the
batch-size finder's answer, on a GPU) and the grid they bound (``--grid``, or powers of two; global batch sizes
under DDP).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

from batchlab.errors import check
from batchlab.quiet import quiet_lightning
from batchlab.study.fitting import Fitter, get_value
from batchlab.study.folder import StudyFolder
from batchlab.study.settings import StudySettings


def train_size(fitter: Fitter) -> int:
    """Training samples, from the training loader's dataset (or batches x batch size without one)."""
    data = copy.deepcopy(fitter.datamodule)
    with quiet_lightning():
        data.setup("fit")
        loader = data.train_dataloader()
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset)
    except TypeError:
        return len(loader) * int(get_value("batch_size", fitter.model, data))


def batch_size_grid(settings: StudySettings, world_size: int, n_train: int, memory_max: Optional[int]) -> list[int]:
    """The batch sizes to measure, each at most the training set, ``--max_batch_size`` and what memory allows."""
    s, w = settings, world_size
    cap = min(x for x in (n_train, s.max_batch_size, memory_max) if x)
    if s.grid is not None:
        grid = sorted(set(s.grid))
        too_big = [b for b in grid if b > cap]
        check(not too_big, f"grid entries {too_big} are above the cap of {cap} (training samples, "
                           "--max_batch_size or the memory limit)")
        uneven = [b for b in grid if b % w]
        check(not uneven, f"grid entries {uneven} are not allowed on {w} devices: batch sizes are global, "
                          f"use multiples of {w}")
    else:
        check(cap >= w, f"no batch size fits: the cap of {cap} is below one sample per device ({w} devices)")
        grid = [w * 2**k for k in range(int(math.log2(cap // w)) + 1)]
    # Regret is always reported for the seed's 2 and the common default 32, where the data allows them.
    return sorted(set(grid) | {b for b in (2, 32) if b <= cap and b % w == 0})


def memory_max(fitter: Fitter, folder: StudyFolder) -> Optional[int]:
    """The finder's largest batch that fits in device memory; None on a CPU, where memory does not bound it."""
    # Lightning's finder refuses DDP: several devices are capped by --max_batch_size instead.
    if fitter.device.type != "cuda" or fitter.ranks.world_size > 1:
        return None

    def search() -> dict[str, Any]:
        from batchlab.tune import BatchSizeSearch, run_tune

        model, data = copy.deepcopy(fitter.model), copy.deepcopy(fitter.datamodule)
        with quiet_lightning():
            trainer = fitter.trainer([], max_steps=10, validate_every=None)
            # binsearch, because Lightning's power search stops at 8192 whatever max_val says.
            finder = BatchSizeSearch(mode="binsearch", margin=0.0, max_val=2**24, steps_per_trial=2)
            result = run_tune(trainer, model, data, finder)
        return {"memory_max_batch_size": result.effective_batch_size, "search": result}

    # The search as batchlab tune reports it, kept whole in memory.json.
    found = folder.measured("memory", search, lambda stored: stored)
    return found["memory_max_batch_size"] if found["search"]["memory_limited"] else None
