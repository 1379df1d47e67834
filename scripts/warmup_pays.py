"""Does the batch-size warmup pay? For two models, trains to the study's target at a fixed small batch, at a
fixed large batch, and with ``BatchSizeWarmup`` growing from the small one by the noise scale, and prints the
optimizer steps, samples and wall seconds of each side by side (issue 12).

    python scripts/warmup_pays.py                       # both cases, seeds 0 1 2, about two minutes on 2 cores
    python scripts/warmup_pays.py --cases toy --seeds 0 --json /tmp/pays.json

The cases:
- ``toy``: the default study's data and model (configs/study.yaml: noisy y = x1 + x2, MLP 2-8-1, SGD momentum
  0.9), validated against clean targets, target val/loss 0.05.
- ``digits``: the digits example (configs/digits.yaml: a small CNN, Adam), target val/acc 0.95.

A fixed run trains at the LR the default study found best at its batch size where there is one (toy), else at
the study's sqrt rule around the config's (batch size, LR) (digits); the warmup starts at the small run's LR and
follows the sqrt rule as it grows. Each run is one fit from the seed's initial
weights; the validation runs every ``check_every`` steps, as the study's trials do. Medians over the seeds;
``reached`` counts the seeds that reached the target within ``max_steps``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping

from batchlab.callbacks import BatchSizeWarmup, NoiseScaleMonitor
from batchlab.quiet import quiet_lightning


@dataclass
class Case:
    model: Callable[[float], Any]
    data: Callable[[int], Any]
    monitor: str
    mode: str
    target: float
    base: tuple[int, float]  # the config's batch size and LR, which the sqrt rule scales from
    lrs: dict[int, float]  # a fixed run's LR where the study measured its best; else the sqrt rule's
    small: int
    large: int
    check_every: int
    max_steps: int = 3000


def _toy_case() -> Case:
    from batchlab.arguments import default_config
    from batchlab.data import ToyRegressionData
    from batchlab.model import MLPRegressor

    config = default_config("study")  # configs/study.yaml, as `batchlab study` reads it
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    return Case(model=lambda lr: MLPRegressor(**{**model, "lr": lr}),
                data=lambda b: ToyRegressionData(**{**data, "batch_size": b}),
                monitor=config["monitor"], mode="min", target=config["target"], base=(data["batch_size"], model["lr"]),
                small=8, large=1024, check_every=config["check_every"],
                # The default study's best LRs (seed 0): B=8 0.002, B=1024 0.0226.
                lrs={8: 0.002, 1024: 0.0226})


def _digits_case() -> Case:
    from batchlab.examples.digits import DigitsCNN, DigitsData

    return Case(model=lambda lr: DigitsCNN(lr=lr), data=lambda b: DigitsData(batch_size=b), monitor="val/acc",
                mode="max", target=0.95, base=(32, 0.002), small=8, large=256, check_every=10, lrs={})


CASES = {"toy": _toy_case, "digits": _digits_case}


@dataclass
class Run:
    case: str
    kind: str  # small, large or warmup
    seed: int
    reached: bool
    steps: int
    samples: int
    wall_s: float
    final_batch_size: int
    changes: list[tuple[int, int]]  # (step, global batch) the warmup grew at


class Samples(Callback):
    def __init__(self) -> None:
        self.samples, self.last = 0, 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.last = len(batch[0])
        self.samples += self.last


def run(name: str, case: Case, kind: str, seed: int) -> Run:
    b0, lr0 = case.base
    batch = case.large if kind == "large" else case.small
    lr = case.lrs.get(batch, lr0 * math.sqrt(batch / b0))
    counter = Samples()
    callbacks: list[Callback] = [counter, EarlyStopping(case.monitor, mode=case.mode, stopping_threshold=case.target,
                                                        patience=10**9, check_finite=True, verbose=False)]
    warmup = None
    if kind == "warmup":
        warmup = BatchSizeWarmup(max_batch_size=case.large, lr_rule="sqrt")
        callbacks += [NoiseScaleMonitor(every_n_steps=10), warmup]
    seed_everything(seed, verbose=False)
    model, data = case.model(lr), case.data(batch)
    with quiet_lightning():
        trainer = Trainer(max_steps=case.max_steps, val_check_interval=case.check_every, check_val_every_n_epoch=None,
                          callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=1)
        start = time.perf_counter()
        trainer.fit(model, data)
        wall = time.perf_counter() - start
    value = trainer.callback_metrics.get(case.monitor)
    reached = value is not None and (float(value) <= case.target if case.mode == "min" else float(value) >= case.target)
    changes = [(c.step, c.batch_size) for c in warmup.changes[1:]] if warmup else []
    return Run(name, kind, seed, reached, trainer.global_step, counter.samples, wall, counter.last, changes)


def table(runs: list[Run]) -> str:
    lines = [f"{'case':<8}{'run':<24}{'reached':<9}{'steps':>8}{'samples':>11}{'wall s':>9}  grew at (step: B)"]
    for name in dict.fromkeys(r.case for r in runs):
        for kind in ("small", "large", "warmup"):
            rs = [r for r in runs if r.case == name and r.kind == kind]
            if not rs:
                continue
            case = CASES[name]()
            label = {"small": f"fixed B={case.small}", "large": f"fixed B={case.large}",
                     "warmup": f"warmup {case.small}..{case.large}"}[kind]
            grew = "; ".join(", ".join(f"{s}: {b}" for s, b in r.changes) or "never" for r in rs)
            steps, samples = statistics.median(r.steps for r in rs), statistics.median(r.samples for r in rs)
            lines.append(f"{name:<8}{label:<24}{sum(r.reached for r in rs)}/{len(rs):<7}{steps:>8.0f}{samples:>11,.0f}"
                         f"{statistics.median(r.wall_s for r in rs):>9.2f}  {grew if kind == 'warmup' else ''}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["toy", "digits"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", help="Where the runs go as JSON.")
    args = parser.parse_args(argv)
    runs = []
    for name in args.cases:
        case = CASES[name]()
        for seed in args.seeds:
            # Interleaved by seed, so that a busy stretch of the machine spoils one seed of each, not one kind.
            for kind in ("small", "large", "warmup"):
                runs.append(run(name, case, kind, seed))
                r = runs[-1]
                print(f"warmup_pays: {name} {kind} seed {seed}: {'reached' if r.reached else 'NOT reached'} in "
                      f"{r.steps} steps, {r.samples:,} samples, {r.wall_s:.2f} s", file=sys.stderr, flush=True)
    print(table(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in runs], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
