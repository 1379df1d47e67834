"""What does ``NoiseScaleMonitor`` cost a fit? Trains the default study's model on its data (configs/study.yaml,
batch size 32) for a fixed number of steps without the monitor and with it, alternating, and prints the median
training time of each and their ratio (issue 12: at most 1.05 at the default ``every_n_steps``).

    python scripts/monitor_cost.py                         # default every_n_steps, and 10, 5 repeats
    python scripts/monitor_cost.py --every 50 --repeats 9 --steps 3000 --json /tmp/cost.json

Runs alternate (plain, monitored, plain, ...) in one process so that a busy stretch of a shared machine spoils
both kinds alike; the ratio is of medians. Only the training loop is timed (``on_train_start`` to
``on_train_end``), without validation, checkpoints or logging.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from typing import Any, Optional

from lightning.pytorch import Callback, Trainer, seed_everything

from batchlab.arguments import default_config
from batchlab.callbacks import NoiseScaleMonitor
from batchlab.data import ToyRegressionData
from batchlab.model import MLPRegressor
from batchlab.quiet import quiet_lightning

DEFAULT_EVERY = inspect.signature(NoiseScaleMonitor).parameters["every_n_steps"].default


class TrainTime(Callback):
    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def train_seconds(steps: int, every: Optional[int]) -> float:
    seed_everything(0, verbose=False)
    config = default_config("study")  # configs/study.yaml, as `batchlab study` reads it
    model = MLPRegressor(**config["model"]["init_args"])
    data = ToyRegressionData(**config["data"]["init_args"])
    timer = TrainTime()
    callbacks: list[Callback] = [timer] + ([NoiseScaleMonitor(every_n_steps=every)] if every else [])
    with quiet_lightning():
        trainer = Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          accelerator="cpu", devices=1)
        trainer.fit(model, data)
    return timer.seconds


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, nargs="+", default=sorted({DEFAULT_EVERY, 10}, reverse=True))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="Where the times go as JSON.")
    args = parser.parse_args(argv)
    train_seconds(50, None)  # warm-up: imports, first allocations
    times: dict[str, list[float]] = {"plain": [], **{f"every {e}": [] for e in args.every}}
    for _ in range(args.repeats):
        times["plain"].append(train_seconds(args.steps, None))
        for e in args.every:
            times[f"every {e}"].append(train_seconds(args.steps, e))
    plain = statistics.median(times["plain"])
    print(f"{args.steps} steps at batch size 32, {args.repeats} alternating repeats (median s; ratio to plain)")
    for name, ts in times.items():
        mark = " (default)" if name == f"every {DEFAULT_EVERY}" else ""
        print(f"  {name + mark:<18} {statistics.median(ts):8.3f} s   x{statistics.median(ts) / plain:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "times": times}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
