"""The batch-size study: which batch size reaches a target loss soonest, measured.

    batchlab study -c configs/study.yaml            # the full study (about 2 minutes on 2 CPU cores)
    batchlab study -c configs/study.yaml --quick    # seconds: noise scale and throughput only

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
skips what is done. ``batchlab.report`` writes the results (CSV, JSON, Markdown, plots, TensorBoard runs).

Under Lightning's DDP (``--trainer.strategy ddp --trainer.devices N``, or torchrun/SLURM) every rank runs this same
study, one fit after another, in step: B is the global batch (B / world size per rank), every measurement is rank
0's, broadcast to all ranks so that all take the same decisions, and rank 0 alone writes. The noise scale then
comes from the ranks' own gradients (B_small = one rank's batch, B_big = the global batch).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import signal
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import lightning
import torch
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.utilities import move_data_to_device, rank_zero_only
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from tqdm.auto import tqdm

from batchlab import scaling
from batchlab._lightning import runs_fits_in_this_process
from batchlab.errors import ConfigError, check
from batchlab.files import jsonable, write_atomically
from batchlab.quiet import STARTUP_LINES, quiet_lightning
from batchlab.runs import device_name
from batchlab.signals import RunInterrupted, StopTogether, agreed_signal, noting_signals, signal_of

# Trainer arguments a study sets itself for each of its runs; every other one (accelerator, devices, precision,
# strategy, gradient clipping...) comes from the configuration.
_STUDY_OWNED = {
    "logger", "callbacks", "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "val_check_interval",
    "check_val_every_n_epoch", "limit_train_batches", "limit_val_batches", "limit_test_batches",
    "limit_predict_batches", "num_sanity_val_steps", "enable_progress_bar", "enable_model_summary",
    "enable_checkpointing", "default_root_dir", "log_every_n_steps", "fast_dev_run", "overfit_batches",
    "reload_dataloaders_every_n_epochs", "profiler",
}
# Settings that say where and how to run, not what is measured: a rerun may change them.
_NOT_IN_FINGERPRINT = {"out", "fresh", "quick"}


@dataclass
class StudySettings:
    """What a study measures; documented on ``BatchlabTrainer.study``, whose arguments these are."""

    target: Optional[float] = None
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    grid: Optional[list[int]] = None
    max_batch_size: Optional[int] = None
    lr_rule: Literal["none", "linear", "sqrt"] = "sqrt"
    base_lr: Optional[float] = None
    base_batch_size: Optional[int] = None
    lr_factors: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    lr_extend: int = 2
    max_steps: int = 2000
    check_every: int = 5
    patience: int = 50
    warmup_steps: int = 5
    throughput_steps: int = 10
    throughput_rounds: int = 3
    gns_batch_size: Optional[int] = None
    gns_points: int = 8
    gns_steps: int = 200
    gns_batches: int = 4
    seed: int = 0
    quick: bool = False
    out: str = "studies/study"
    fresh: bool = False

    def validate(self) -> None:
        if not self.quick:
            check(self.target is not None, "--target is required for a full study: the value of --monitor to "
                                           "reach (or use --quick, which needs none)")
        if self.target is not None:
            check(math.isfinite(self.target), f"target={self.target} is not allowed: use a finite number")
        check(self.mode in ("min", "max"), f"mode={self.mode!r} is not allowed: use 'min' or 'max'")
        check(self.lr_rule in ("none", "linear", "sqrt"),
              f"lr_rule={self.lr_rule!r} is not allowed: use 'none', 'linear' or 'sqrt'")
        if self.grid is not None:
            check(len(self.grid) > 0, "grid=[] is not allowed: give at least one batch size")
            for b in self.grid:
                check(_is_pos_int(b), f"grid entry {b!r} is not allowed: batch sizes are positive integers")
        for name in ("max_steps", "check_every", "throughput_steps", "throughput_rounds", "gns_steps", "gns_batches"):
            value = getattr(self, name)
            check(_is_pos_int(value), f"{name}={value!r} is not allowed: use a positive integer")
        for name in ("max_batch_size", "base_batch_size", "gns_batch_size"):
            value = getattr(self, name)
            check(value is None or _is_pos_int(value), f"{name}={value!r} is not allowed: use a positive integer")
        check(_is_int(self.warmup_steps) and self.warmup_steps >= 1,
              f"warmup_steps={self.warmup_steps!r} is not allowed: use a positive integer")
        check(_is_int(self.gns_points) and self.gns_points >= 2,
              f"gns_points={self.gns_points!r} is not allowed: use an integer >= 2")
        check(_is_int(self.patience) and self.patience >= 0,
              f"patience={self.patience!r} is not allowed: use an integer >= 0 (0: never give up early)")
        check(_is_int(self.lr_extend) and self.lr_extend >= 0,
              f"lr_extend={self.lr_extend!r} is not allowed: use an integer >= 0")
        check(len(self.lr_factors) > 0 and all(math.isfinite(f) and f > 0 for f in self.lr_factors),
              f"lr_factors={self.lr_factors} is not allowed: use positive numbers, e.g. [0.5, 1, 2]")
        if self.base_lr is not None:
            check(math.isfinite(self.base_lr) and self.base_lr > 0,
                  f"base_lr={self.base_lr} is not allowed: use a number > 0")

    def fingerprint(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in _NOT_IN_FINGERPRINT}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pos_int(value: Any) -> bool:
    return _is_int(value) and value >= 1


# The batch-size finder's and the LR finder's contracts: an attribute or hparam of the model or the data.
def _holders(name: str, *objects: Any) -> list[Any]:
    holders = []
    for obj in objects:
        if obj is None:
            continue
        if hasattr(obj, name):
            holders.append(obj)
        hparams = getattr(obj, "hparams", None)
        if hparams is not None and name in hparams:
            holders.append(hparams)
    return holders


def get_value(name: str, *objects: Any) -> Any:
    holder = _holders(name, *objects)[-1]
    return holder[name] if isinstance(holder, dict) else getattr(holder, name)


def set_value(name: str, value: Any, *objects: Any) -> None:
    for holder in _holders(name, *objects):
        if isinstance(holder, dict):
            holder[name] = value
        else:
            setattr(holder, name, value)


def lr_name(model: LightningModule) -> str:
    for name in ("lr", "learning_rate"):
        if _holders(name, model):
            return name
    raise ConfigError(
        f"{type(model).__name__} has no `lr` or `learning_rate` attribute or hparam: the study sets the learning "
        "rate through it (the LR finder's contract)"
    )


def check_batch_size_holder(model: LightningModule, datamodule: Any) -> None:
    check(
        bool(_holders("batch_size", model, datamodule)),
        f"neither {type(model).__name__} nor {type(datamodule).__name__} has a `batch_size` attribute or hparam: "
        "the study sets the batch size through it (the batch-size finder's contract)",
    )


class StudyFolder:
    """The study's folder: its fingerprint (``study.json``) and one JSON file per finished measurement."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def open(cls, out: str, fingerprint: dict[str, Any], fresh: bool) -> StudyFolder:
        root = Path(out)
        if fresh and root.exists():
            k = 2
            while Path(f"{out}-{k}").exists():
                k += 1
            root = Path(f"{out}-{k}")
        meta = root / "study.json"
        if meta.is_file():
            saved = json.loads(meta.read_text())
            measured = any(p.name != "study.json" for p in root.iterdir())
            if saved != jsonable(fingerprint) and measured:
                changed = sorted(_diff(saved, jsonable(fingerprint)))
                raise ConfigError(
                    f"{root} holds a study made with a different configuration (changed: {', '.join(changed)}); "
                    f"it is kept as it is: use --out NEW_FOLDER, or --fresh true for a new folder beside it"
                )
        elif root.exists() and any(root.iterdir()):
            raise ConfigError(f"{root} exists and is not a batchlab study: choose another --out")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create the study folder {root}: {err.strerror}") from err
        folder = cls(root)
        folder.write("study", fingerprint)  # unchanged, or a folder that holds no measurement yet
        return folder

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def read(self, key: str) -> Optional[dict[str, Any]]:
        path = self.path(key)
        return json.loads(path.read_text()) if path.is_file() else None

    def write(self, key: str, data: dict[str, Any]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(jsonable(data), indent=1, allow_nan=False) + "\n")


def _diff(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


class StepTimer(Callback):
    """Times optimizer steps after ``warmup`` of them, from one ``on_train_batch_end`` to the next (the whole
    step: data, forward, backward, optimizer, hooks), synchronising the GPU so that queued work is counted."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._last: Optional[float] = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if self._last is not None and trainer.global_step > self.warmup:
            self.times.append(now - self._last)
        self._last = now


class CurveRecorder(Callback):
    """Records the monitored metric at every validation, with the step, samples seen and seconds so far, and
    stops a trial whose training loss is no longer finite (it has diverged; no need to wait for a check)."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.curve: list[dict[str, float]] = []
        self.samples = 0
        self.diverged_at: Optional[int] = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.samples += extract_batch_size(batch) * trainer.world_size
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        diverged = isinstance(loss, Tensor) and not bool(torch.isfinite(loss).all())
        if trainer.world_size > 1:
            # Each rank's loss is its own shard's: one rank's can overflow a step before the others'. A rank that
            # stopped alone would leave the others waiting in their next collective for ever: they agree first.
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            self.diverged_at = trainer.global_step
            trainer.should_stop = True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            available = sorted(k for k in trainer.callback_metrics if not k.startswith("train"))
            raise ConfigError(
                f"the model does not log monitor={self.monitor!r} in validation; it logs {available or 'nothing'}"
            )
        self.curve.append({"step": trainer.global_step, "samples": self.samples,
                           "seconds": time.perf_counter() - self._start, "value": float(value)})


class StudyStopTogether(StopTogether):
    """``StopTogether`` for the study's fits: a signal is the study's to note (its handler covers the time between
    fits too), and the ranks that agree on it end the fit, which the study then discards as unfinished."""

    def __init__(self, study: Study) -> None:
        super().__init__()
        self.study = study
        self.handle = study.signal_handler  # type: ignore[method-assign]

    def own_signal(self) -> Optional[str]:
        return self.study.stop_signal

    def stop(self, trainer: Trainer, signame: str) -> None:
        trainer.should_stop = True


class Snapshots(Callback):
    """Keeps CPU copies of the weights at the given steps (and at the start) for the noise-scale estimates."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.states: list[tuple[int, dict[str, Tensor]]] = []

    def _keep(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        self.states.append((trainer.global_step, state))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._keep(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step in self.steps and trainer.global_step != self.states[-1][0]:
            self._keep(trainer, pl_module)


class Study:
    """Runs one study; ``run()`` returns the summary that ``batchlab.report`` writes out."""

    def __init__(self, model: LightningModule, datamodule: LightningDataModule, trainer_kwargs: dict[str, Any],
                 settings: StudySettings, config: Optional[dict[str, Any]] = None) -> None:
        settings.validate()
        check(datamodule is not None, "the study needs a LightningDataModule (--data.class_path)")
        check_batch_size_holder(model, datamodule)
        self.lr_attr = lr_name(model)
        # The noise scale differentiates the loss training_step returns; with manual optimization it returns none.
        check(model.automatic_optimization,
              f"{type(model).__name__} uses manual optimization: the study needs training_step to return the "
              "loss (automatic optimization) to measure the gradient noise scale")
        accumulate = trainer_kwargs.get("accumulate_grad_batches") or 1
        check(accumulate == 1, f"trainer.accumulate_grad_batches={accumulate} is not allowed in a study: its batch "
                               "size is the batch of one optimizer step; study that batch size directly")
        self.model, self.datamodule, self.settings = model, datamodule, settings
        self.trainer_kwargs = {k: v for k, v in trainer_kwargs.items() if k not in _STUDY_OWNED}
        self.base_lr = settings.base_lr or float(get_value(self.lr_attr, model))
        self.base_batch_size = settings.base_batch_size or int(get_value("batch_size", model, datamodule))
        # Measurements from another device or software stack are not comparable: they belong to another study.
        probe = self._probe()
        self.device, self.world_size, self.strategy = probe.strategy.root_device, probe.world_size, probe.strategy
        if self.world_size > 1:
            named = trainer_kwargs.get("strategy")
            check(runs_fits_in_this_process(self.strategy),
                  f"strategy={named if isinstance(named, str) else type(self.strategy).__name__} is not allowed in a "
                  f"study on {self.world_size} devices: use ddp (each rank runs the study's fits in turn, in its own "
                  "process)")
            self._check_divisible("base_batch_size", self.base_batch_size if settings.base_batch_size else None)
            # The configured batch size is per device; the study's batch sizes are global.
            self.base_batch_size = settings.base_batch_size or self.base_batch_size * self.world_size
        machine = {"device": device_name(self.device), "torch": torch.__version__,
                   "lightning": lightning.__version__}
        if self.world_size > 1:  # where torchrun or SLURM set it, `devices` in the configuration may not show it
            machine["world_size"] = self.world_size
        self.fingerprint = {"study": settings.fingerprint(), "config": config or self._describe_objects(),
                            "machine": machine}
        self.folder: Optional[StudyFolder] = None  # opened once the configuration has been checked
        self._bar: Optional[tqdm] = None

    # Ranks ---------------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        # Lightning's rank_zero_only.rank is right from the start in every process it launches; the process group,
        # once up, is the authority.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return rank_zero_only.rank

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def _shared(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (``value`` itself on one device): the ranks measure together, but only
        rank 0's figures count, so that every rank takes the same decisions and stays in step."""
        return self.strategy.broadcast(value, src=0) if self.world_size > 1 else value

    def _check_divisible(self, name: str, batch_size: Optional[int]) -> None:
        w = self.world_size
        check(batch_size is None or batch_size % w == 0,
              f"{name}={batch_size} is not allowed on {w} devices: batch sizes are global, use a multiple of {w}")

    def _on_rank_zero(self, work: Callable[[], Any]) -> Any:
        """``work()`` on rank 0 (the folder's reads and writes), its result on every rank. Should it fail, every
        rank stops: a failure on rank 0 alone would leave the others waiting in their next collective for ever.
        The others raise a refusal as it is, and exit quietly on any other error, which rank 0 reports."""
        if self.world_size == 1:
            return work()
        outcome: Any = None
        if self.is_global_zero:
            try:
                outcome = ("ok", work())
            except ConfigError as err:
                outcome = ("refused", str(err))
            except Exception as err:
                self._shared(("failed", None))
                raise err
        kind, value = self._shared(outcome)
        if kind == "refused":
            raise ConfigError(value)
        if kind == "failed":
            raise SystemExit(1)
        return value

    def _measured(self, key: str, measure: Any) -> Any:
        """The measurement stored under ``key`` in the study's folder, or ``measure()`` run now and stored."""
        cached = self._on_rank_zero(lambda: self.folder.read(key))
        if cached is None:
            # As stored (non-finite numbers as null), so that a resumed study computes from the same values.
            cached = self._shared(jsonable(measure()))
            self._on_rank_zero(lambda: self.folder.write(key, cached))
        return cached

    def _open_folder(self) -> StudyFolder:
        """Rank 0 opens (or refuses) the folder; the others learn where it is, or the refusal."""
        s = self.settings
        return StudyFolder(Path(self._on_rank_zero(lambda: str(StudyFolder.open(s.out, self.fingerprint,
                                                                                  s.fresh).root))))

    def _describe_objects(self) -> dict[str, Any]:
        out = {"trainer": self.trainer_kwargs}
        for key, obj in (("model", self.model), ("data", self.datamodule)):
            out[key] = {"class_path": f"{type(obj).__module__}.{type(obj).__qualname__}",
                        "hparams": dict(getattr(obj, "hparams_initial", {}) or {})}
        return out

    # Running fits -------------------------------------------------------------------------------------------
    def _trainer(self, callbacks: list[Callback], max_steps: int, validate_every: Optional[int]) -> Trainer:
        kwargs = dict(self.trainer_kwargs)
        kwargs.update(
            logger=False, callbacks=callbacks, max_steps=max_steps, max_epochs=-1, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
            default_root_dir=str(self.folder.root) if self.folder else None, log_every_n_steps=max(1, max_steps),
        )
        if validate_every is None:
            kwargs["limit_val_batches"] = 0
        else:
            kwargs.update(val_check_interval=validate_every, check_val_every_n_epoch=None)
        return Trainer(**kwargs)

    def _fit(self, batch_size: int, lr: float, callbacks: list[Callback], max_steps: int,
             validate_every: Optional[int]) -> tuple[LightningModule, Trainer]:
        model, data = copy.deepcopy(self.model), copy.deepcopy(self.datamodule)
        set_value("batch_size", batch_size // self.world_size, model, data)
        set_value(self.lr_attr, lr, model)
        seed_everything(self.settings.seed, verbose=False)
        self._check_stop()
        if self.world_size > 1:
            callbacks = [*callbacks, StudyStopTogether(self)]
        with quiet_lightning():
            trainer = self._active = self._trainer(callbacks, max_steps, validate_every)
            try:
                trainer.fit(model, datamodule=data)
            except BaseException as exc:
                signame = signal_of(exc)  # Lightning's own SIGTERM handler stops a fit with an exception
                if signame is None:
                    raise
                self._stop = signame
            finally:
                self._active = None
        self._check_stop()  # a fit cut short by a signal is not a measurement
        return model, trainer

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """Turn Ctrl+C and SIGTERM into a clean stop: the running fit ends at its next step, nothing unfinished is
        recorded, and ``RunInterrupted`` says how to resume."""
        self._stop: Optional[str] = None
        self._active: Optional[Trainer] = None

        def handler(signum: int, frame: Any) -> None:
            self._stop = signal.Signals(signum).name
            if self._active is not None and self.world_size == 1:  # under DDP StopTogether stops all ranks at once
                self._active.should_stop = True

        self.signal_handler = handler
        with noting_signals(handler):
            yield

    def _check_stop(self) -> None:
        """Raise ``RunInterrupted`` once a signal came. Under DDP every rank calls this at the same points, so the
        ranks agree there, and all stop together, or none."""
        if self.world_size > 1:
            # Only the ranks' joint answer counts: a signal landing just after it waits for the next check.
            agreed = agreed_signal(self.strategy, self.stop_signal)
            if agreed is None:
                return
            self._stop = agreed
        if getattr(self, "_stop", None):
            where = self.folder.root if self.folder else self.settings.out
            message = (f"study interrupted by {self._stop}; every finished measurement is kept in {where}: rerun "
                       "the same command to resume")
            raise RunInterrupted(self._stop, message if self.is_global_zero else None)

    @property
    def stop_signal(self) -> Optional[str]:
        """The signal this rank had, if any."""
        return getattr(self, "_stop", None)

    def centre_lr(self, batch_size: int) -> float:
        ratio = batch_size / self.base_batch_size
        return self.base_lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.settings.lr_rule]

    # The measurements ---------------------------------------------------------------------------------------
    def train_size(self) -> int:
        """Training samples, from the training loader's dataset (or batches x batch size without one)."""
        data = copy.deepcopy(self.datamodule)
        with quiet_lightning():
            data.setup("fit")
            loader = data.train_dataloader()
        dataset = getattr(loader, "dataset", None)
        try:
            return len(dataset)
        except TypeError:
            return len(loader) * int(get_value("batch_size", self.model, data))

    def grid(self, n_train: int, memory_max: Optional[int]) -> list[int]:
        s = self.settings
        w = self.world_size
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

    def memory_max(self) -> Optional[int]:
        """The finder's largest batch that fits in device memory; None on a CPU, where memory does not bound it."""
        # Lightning's finder refuses DDP: several devices are capped by --max_batch_size instead.
        if self.device.type != "cuda" or self.world_size > 1:
            return None

        def search() -> dict[str, Any]:
            from batchlab.tune import BatchSizeSearch, run_tune

            model, data = copy.deepcopy(self.model), copy.deepcopy(self.datamodule)
            with quiet_lightning():
                trainer = self._trainer([], max_steps=10, validate_every=None)
                # binsearch, because Lightning's power search stops at 8192 whatever max_val says.
                finder = BatchSizeSearch(mode="binsearch", margin=0.0, max_val=2**24, steps_per_trial=2)
                result = run_tune(trainer, model, data, finder)
            return {"memory_max_batch_size": result.effective_batch_size, "search": result}

        cached = self._measured("memory", search)
        return cached["memory_max_batch_size"] if cached["search"]["memory_limited"] else None

    def throughput(self, grid: list[int]) -> list[dict[str, Any]]:
        """Time per step for every B, in ``throughput_rounds`` interleaved passes over the grid, keeping each B's
        fastest pass: on a shared machine a burst of other work then spoils one pass of a few B, not the fit."""
        rounds: dict[int, list[float]] = {b: [] for b in grid}
        for r in range(self.settings.throughput_rounds):
            for b in grid:
                rounds[b].append(self._time_steps(b, r)["step_s"])
        return [{"batch_size": b, "step_s": min(t), "samples_per_s": b / min(t), "rounds_s": t}
                for b, t in rounds.items()]

    def _time_steps(self, batch_size: int, round_: int) -> dict[str, Any]:
        def measure() -> dict[str, Any]:
            s = self.settings
            timer = StepTimer(s.warmup_steps)
            self._fit(batch_size, self.centre_lr(batch_size), [timer], s.warmup_steps + s.throughput_steps + 1, None)
            times = sorted(timer.times)
            # A low quantile, not the mean: other work on the machine only ever adds time to a step.
            return {"batch_size": batch_size, "step_s": times[len(times) // 5],
                    "median_step_s": times[len(times) // 2], "steps_timed": len(times)}

        cached = self._measured(f"throughput/bs{batch_size}-round{round_}", measure)
        self._tick()
        return cached

    def trial(self, batch_size: int, factor: float, max_steps: int) -> dict[str, Any]:
        lr = self.centre_lr(batch_size) * factor
        cached = self._measured(f"trials/bs{batch_size}-lr{lr:.6g}",
                                lambda: self._run_trial(batch_size, lr, factor, max_steps))
        self._tick()
        return cached

    def _run_trial(self, batch_size: int, lr: float, factor: float, max_steps: int) -> dict[str, Any]:
        s = self.settings
        recorder = CurveRecorder(s.monitor)
        stopper = EarlyStopping(s.monitor, mode=s.mode, stopping_threshold=s.target, check_finite=True,
                                patience=s.patience or 10**9, verbose=False)
        start = time.perf_counter()
        _, trainer = self._fit(batch_size, lr, [recorder, stopper], max_steps, s.check_every)
        wall = time.perf_counter() - start
        reached = next((p for p in recorder.curve if self._reached(p["value"])), None)
        values = [p["value"] for p in recorder.curve]
        if reached is not None:
            status = "reached"
        elif recorder.diverged_at is not None or any(not math.isfinite(v) for v in values):
            status = "diverged"
        elif trainer.global_step < max_steps:
            status = "stalled"  # no improvement in `patience` validations: abandoned early
        elif max_steps < s.max_steps:
            status = "pruned"  # stopped at the step count of a better LR at this batch size: it cannot win
        else:
            status = "budget"
        finite = [v for v in values if math.isfinite(v)]
        best = (min(finite) if s.mode == "min" else max(finite)) if finite else None
        return {
            "batch_size": batch_size, "lr": lr, "lr_factor": factor, "status": status,
            "steps": reached["step"] if reached else None,
            "samples": reached["samples"] if reached else None,
            "seconds_to_target": reached["seconds"] if reached else None,
            "steps_run": trainer.global_step, "max_steps": max_steps, "wall_s": wall,
            "best_value": best, "final_value": values[-1] if values else None, "curve": recorder.curve,
        }

    def _reached(self, value: float) -> bool:
        target = self.settings.target
        return math.isfinite(value) and (value <= target if self.settings.mode == "min" else value >= target)

    def sweep(self, batch_size: int) -> list[dict[str, Any]]:
        """Trials at one batch size: the LR factors nearest 1 first (so later ones are bounded by a good result),
        then, while the best LR sits at an edge of the grid, up to ``lr_extend`` more beyond it."""
        s = self.settings
        factors = sorted(set(s.lr_factors), key=lambda f: (abs(math.log(f)), f))
        ratio = _grid_ratio(s.lr_factors)
        results: list[dict[str, Any]] = []
        extended = {"up": 0, "down": 0}
        while factors:
            factor = factors.pop(0)
            best = _best(results)
            budget = min(s.max_steps, best["steps"]) if best else s.max_steps
            results.append(self.trial(batch_size, factor, budget))
            if not factors:
                direction = _extend_direction(results)
                if direction and extended[direction] < s.lr_extend:
                    extended[direction] += 1
                    edge = max(r["lr_factor"] for r in results) if direction == "up" else min(
                        r["lr_factor"] for r in results)
                    factors.append(edge * ratio if direction == "up" else edge / ratio)
                    self._add_to_total(1)
        return results

    def noise_scale(self) -> dict[str, Any]:
        cached = self._measured("gns", self._measure_noise_scale)
        self._tick()
        return cached

    def _measure_noise_scale(self) -> dict[str, Any]:
        s = self.settings
        b_ref = self.base_batch_size
        every = max(1, s.gns_steps // (s.gns_points - 1))
        snapshots = Snapshots({every * k for k in range(1, s.gns_points)})
        recorder = CurveRecorder(s.monitor)
        callbacks: list[Callback] = [snapshots, recorder]
        if s.target is not None:
            callbacks.append(EarlyStopping(s.monitor, mode=s.mode, stopping_threshold=s.target, patience=10**9,
                                           check_finite=True, verbose=False))
        model, trainer = self._fit(b_ref, self.centre_lr(b_ref), callbacks, s.gns_steps, every)
        device = trainer.strategy.root_device
        b_big = self.noise_batch_size
        batches = self._noise_batches(b_big, device)
        probe = copy.deepcopy(self.model).to(device)
        curve = {p["step"]: p["value"] for p in recorder.curve}
        points, finite, method = [], {}, None
        for step, state in snapshots.states:
            probe.load_state_dict(state)
            estimates, method = self._noise_samples(probe, batches, method)
            point = {"step": step, "samples_seen": step * b_ref, "value": curve.get(step)}
            if all(math.isfinite(x.g2) and math.isfinite(x.trace) for xs in estimates.values() for x in xs):
                finite[step] = estimates
            for name, samples in estimates.items():
                prefix = "" if name == method else f"{name}_"
                point.update({f"{prefix}g2": sum(x.g2 for x in samples) / len(samples),
                              f"{prefix}trace": sum(x.trace for x in samples) / len(samples),
                              f"{prefix}b_simple": scaling.b_simple(samples)})
            points.append(point)
        # The study's B_simple averages the points of training, not the initial weights: at step 0 |G|^2 is
        # typically orders of magnitude above its value anywhere later (the default study: 14,000 at step 0, 6-410
        # after), so pooling it in gave the initial weights' figure (0.72 against 2-125 later, B_crit 7.3). Step 0
        # stays in the trajectory; it is used alone only when no later point exists (a reference run that diverged
        # or reached the target before its first snapshot), which the answer then warns of.
        used = [p for p in points if p["step"] in finite and p["step"] > 0] or [
            p for p in points[:1] if p["step"] in finite]
        check(bool(used), "the noise scale's gradients are not finite even at the initial weights: check the model's "
                          "initialisation and its loss on the training data")
        pooled: dict[str, list[scaling.NoiseSample]] = {}
        for p in used:
            for name, samples in finite[p["step"]].items():
                pooled.setdefault(name, []).extend(samples)
        decay = 0.5
        g2_ema = scaling.ema([p["g2"] for p in used], decay)
        trace_ema = scaling.ema([p["trace"] for p in used], decay)
        emas = {p["step"]: t / g if g > 0 else math.inf for p, g, t in zip(used, g2_ema, trace_ema)}
        for p in points:
            p["b_simple_ema"] = emas.get(p["step"])
        out = {"b_simple": scaling.b_simple(pooled[method]), "method": method, "reference_batch_size": b_ref,
               "reference_lr": self.centre_lr(b_ref), "estimate_batch_size": b_big,
               "batches_per_point": len(batches), "averaged_steps": [p["step"] for p in used],
               "reference_diverged_at": recorder.diverged_at, "points": points}
        if self.world_size > 1:
            out.update(rank_batch_size=b_big // self.world_size, b_simple_ranks=scaling.b_simple(pooled["ranks"]))
        return out

    def _noise_batches(self, b_big: int, device: torch.device) -> list[Any]:
        data = copy.deepcopy(self.datamodule)
        set_value("batch_size", b_big, data)
        with torch.random.fork_rng(devices=[]), quiet_lightning():
            torch.manual_seed(self.settings.seed + 1)
            data.setup("fit")
            batches = []
            for batch in data.train_dataloader():
                if extract_batch_size(batch) == b_big:
                    batches.append(move_data_to_device(batch, device))
                if len(batches) == self.settings.gns_batches:
                    break
        check(bool(batches), f"no full training batch of {b_big} samples for the noise scale: lower --gns_batch_size")
        return batches

    def _noise_samples(self, probe: LightningModule, batches: list[Any],
                       method: Optional[str]) -> tuple[dict[str, list[scaling.NoiseSample]], str]:
        """Noise estimates from each batch, by method; the method the study uses is returned beside them."""
        def loss_fn(batch: Any) -> Tensor:
            out = probe.training_step(batch, 0)
            return out["loss"] if isinstance(out, dict) else out

        with quiet_lightning(), torch.enable_grad():
            if self.world_size > 1:
                return self._data_parallel_samples(probe, loss_fn, batches, method)
            if method in (None, "per_example") and all(_tensor_tuple(b) for b in batches):
                try:
                    return {"per_example": [scaling.per_example_noise(probe, loss_fn, tuple(b))
                                            for b in batches]}, "per_example"
                except Exception:  # noqa: BLE001 - any model torch.func cannot vmap falls back to plain autograd
                    if method == "per_example":
                        raise
            b_big = extract_batch_size(batches[0])
            b_small = max(1, b_big // 16)
            return {"two_batch": [scaling.two_batch_noise(probe, loss_fn, _as_tuple(b), b_small)
                                  for b in batches]}, "two_batch"

    def _data_parallel_samples(self, probe: LightningModule, loss_fn: Any, batches: list[Any],
                               method: Optional[str]) -> tuple[dict[str, list[scaling.NoiseSample]], str]:
        """Under DDP each rank differentiates its own slice of every batch. The ranks' gradient norms give the
        estimate DDP gets for free (``ranks``: B_small = one rank's batch, B_big = the global batch); where
        torch.func can vmap the model, per-example gradients on each rank give the study's estimate, the same as
        one device's per-example estimate of the global batch: the ranks' estimate is far noisier (its relative
        error per batch is about 2 sqrt(2 B_small / B_simple)), so it is kept beside it."""
        w, rank = self.world_size, self.rank
        b_big = extract_batch_size(batches[0])
        b_local = b_big // w

        def mean_over_ranks(t: Tensor) -> Tensor:
            return self.strategy.reduce(t, reduce_op="mean")

        out: dict[str, list[scaling.NoiseSample]] = {"ranks": [], "per_example": []}
        # Whether vmap works is the same on every rank (the same model and batches), so every rank takes the same
        # collectives.
        per_example = method in (None, "per_example") and all(_tensor_tuple(b) for b in batches)
        for batch in batches:
            local = _rows(batch, rank * b_local, (rank + 1) * b_local)
            if per_example:
                try:
                    grad, example_sq = scaling.per_example_gradients(probe, loss_fn, tuple(local))
                except Exception:  # noqa: BLE001 - as on one device, fall back to plain autograd
                    if method == "per_example":
                        raise
                    per_example = False
            if per_example:
                out["per_example"].append(scaling.data_parallel_noise(grad, example_sq, 1, b_big, mean_over_ranks))
            else:
                grad = scaling.local_gradient(probe, loss_fn, local)
            out["ranks"].append(scaling.data_parallel_noise(grad, grad.pow(2).sum().item(), b_local, b_big,
                                                            mean_over_ranks))
        if not per_example:
            del out["per_example"]
        return out, "per_example" if per_example else "ranks"
    # The whole study ----------------------------------------------------------------------------------------
    def check_monitor(self) -> None:
        """One validation batch, so that a metric the model does not log is reported before any measurement."""
        model, data = copy.deepcopy(self.model), copy.deepcopy(self.datamodule)
        with quiet_lightning():
            trainer = self._trainer([StudyStopTogether(self)] if self.world_size > 1 else [], max_steps=1,
                                    validate_every=1)
            trainer.limit_val_batches = 1
            trainer.validate(model, datamodule=data, verbose=False)
        if self.settings.monitor not in trainer.callback_metrics:
            logged = sorted(trainer.callback_metrics) or "nothing (is there a validation split?)"
            raise ConfigError(f"the model does not log monitor={self.settings.monitor!r} in validation; "
                              f"it logs {logged}")

    def run(self) -> dict[str, Any]:
        with self._stop_on_signals():
            return self._run()

    def _run(self) -> dict[str, Any]:
        s = self.settings
        w = self.world_size
        n_train = self.train_size()
        self.grid(n_train, None)  # a bad --grid is refused before anything is written
        self.noise_batch_size = b_big = s.gns_batch_size or min(1024, n_train) // w * w
        check(2 * w <= b_big <= n_train, f"gns_batch_size={b_big} is not allowed: the noise scale needs full batches "
                                         f"of {2 * w} to {n_train} samples (the training set)")
        self._check_divisible("gns_batch_size", b_big)
        self.check_monitor()
        self.folder = self._open_folder()
        STARTUP_LINES.show()  # the study's input has passed its checks
        memory_max = self.memory_max()
        grid = self.grid(n_train, memory_max)
        total = len(grid) * s.throughput_rounds + 1 + (0 if s.quick else len(grid) * len(set(s.lr_factors)))
        self._bar = tqdm(total=total, desc="batchlab study", unit="run", dynamic_ncols=True,
                         disable=not self.is_global_zero)
        try:
            throughput = self.throughput(grid)
            self.gns = self.noise_scale()
            self.sweeps = {} if s.quick else {b: self.sweep(b) for b in grid}
            self._check_stop()
        finally:
            self._bar.close()
        return summarise(self, grid, n_train, memory_max, throughput, self.gns, self.sweeps,
                         device_name(self.device))

    def _probe(self) -> Trainer:
        with quiet_lightning():
            return Trainer(**{**self.trainer_kwargs, "logger": False, "enable_progress_bar": False})

    def _tick(self) -> None:
        if self._bar is not None:
            self._bar.update(1)
        self._check_stop()

    def _add_to_total(self, n: int) -> None:
        if self._bar is not None:
            self._bar.total += n
            self._bar.refresh()


def _rows(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in a batch (of any nesting)."""
    return apply_to_collection(batch, Tensor, lambda t: t[start:stop])


def _tensor_tuple(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and all(isinstance(t, Tensor) for t in batch)


def _as_tuple(batch: Any) -> tuple[Any, ...]:
    check(_tensor_tuple(batch), "the two-batch noise estimate needs batches that are tuples of tensors")
    return tuple(batch)


def _grid_ratio(factors: list[float]) -> float:
    ordered = sorted(set(factors))
    if len(ordered) < 2:
        return 2.0
    return min(b / a for a, b in zip(ordered, ordered[1:]))


def _best(results: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The trial that reached the target in the fewest steps; among equal steps the one tried first (factor nearest
    1, the sweep's order), which a later trial at the same step count cannot beat. Not the shorter wall time: at one
    batch size and step count that differs only by the machine's noise, and the answer must not."""
    reached = [r for r in results if r["status"] == "reached"]
    return min(reached, key=lambda r: (r["steps"], abs(math.log(r["lr_factor"])), r["lr_factor"])) if reached else None


def _extend_direction(results: list[dict[str, Any]]) -> Optional[str]:
    """Where to try one more LR: beyond the edge that holds the best result. With no result, a too-high LR shows
    as instability (divergence, or a trial that stalls or dies) and a too-low one as steady progress that runs
    out of steps: go down if even the lowest LR was unstable, up if every LR just ran out of steps."""
    by_factor = sorted(results, key=lambda r: r["lr_factor"])
    low, high = by_factor[0], by_factor[-1]
    if len(by_factor) < 2:
        return None
    best = _best(results)
    if best is not None:
        if best is high and high["status"] != "diverged":
            return "up"
        return "down" if best is low else None
    if low["status"] in ("diverged", "stalled"):
        return "down"
    if all(r["status"] in ("budget", "pruned") for r in by_factor):
        return "up"
    return None


def summarise(study: Study, grid: list[int], n_train: int, memory_max: Optional[int],
              throughput: list[dict[str, Any]], gns: dict[str, Any], sweeps: dict[int, list[dict[str, Any]]],
              device: str) -> dict[str, Any]:
    """Fit and recommend: everything ``summary.json`` holds."""
    s = study.settings
    fit_t = scaling.fit_throughput([t["batch_size"] for t in throughput], [t["step_s"] for t in throughput])
    step_s = {t["batch_size"]: t["step_s"] for t in throughput}
    # A null noise scale is an infinite one: the mean gradient was lost in the noise (scaling.b_simple).
    b_star_quick = scaling.optimal_batch_size(math.inf if gns["b_simple"] is None else gns["b_simple"], fit_t)
    quick_b = scaling.nearest_in_grid(b_star_quick, grid) if not math.isnan(b_star_quick) else None
    summary: dict[str, Any] = {
        "quick": s.quick, "target": s.target, "monitor": s.monitor, "mode": s.mode, "grid": grid,
        "train_samples": n_train, "device": device, "world_size": study.world_size,
        "memory_max_batch_size": memory_max, "memory_bound": memory_max is not None,
        "alpha_s": fit_t.alpha, "beta_s": fit_t.beta,
        "b_simple": gns["b_simple"], "b_simple_method": gns["method"], "b_simple_ranks": gns.get("b_simple_ranks"),
        "b_simple_steps": gns.get("averaged_steps"), "reference_diverged_at": gns.get("reference_diverged_at"),
        "quick_b_star": b_star_quick, "quick_recommended_batch_size": quick_b,
        "lr_rule": s.lr_rule, "base_lr": study.base_lr, "base_batch_size": study.base_batch_size,
        "folder": str(study.folder.root),
    }
    if s.quick:
        summary.update(batch_sizes=[{"batch_size": t["batch_size"], "step_s": t["step_s"],
                                     "samples_per_s": t["samples_per_s"]} for t in throughput])
        summary.update(recommended_batch_size=quick_b,
                       recommended_lr=study.centre_lr(quick_b) if quick_b else None,
                       recommended_by="quick: sqrt(B_simple * alpha / beta), nearest grid batch size; LR from the "
                                      "scaling rule, not tuned")
        return summary
    per_b = {}
    for b in grid:
        best = _best(sweeps[b])
        entry = {"batch_size": b, "step_s": step_s[b], "samples_per_s": b / step_s[b]}
        if best:
            entry.update(steps=best["steps"], samples=best["samples"], lr=best["lr"],
                         time_to_target_s=best["steps"] * step_s[b], trial_wall_s=best["wall_s"],
                         # Still at an edge once --lr_extend ran out: a better LR may lie beyond it, and the steps
                         # (so B_crit and the answer) would then be too high at this B.
                         lr_at_edge=_extend_direction(sweeps[b]))
        else:
            statuses = sorted({r["status"] for r in sweeps[b]})
            entry.update(steps=None, samples=None, lr=None, time_to_target_s=None, never_reached=statuses)
        per_b[b] = entry
    reached = [e for e in per_b.values() if e["time_to_target_s"] is not None]
    fit_s = scaling.fit_steps([e["batch_size"] for e in reached], [e["steps"] for e in reached])
    summary.update(
        s_min=fit_s.s_min if fit_s else None, e_min=fit_s.e_min if fit_s else None,
        b_crit=fit_s.b_crit if fit_s else None,
        model_b_star=scaling.optimal_batch_size(fit_s.b_crit, fit_t) if fit_s else None,
    )
    if not reached:
        summary.update(recommended_batch_size=None, recommended_lr=None, batch_sizes=list(per_b.values()),
                       within_10_percent=[], quick_regret=None, lr_at_edge=[],
                       recommended_by="nothing reached the target: raise --max_steps, widen --lr_factors or "
                                      "loosen --target")
        return summary
    best = min(reached, key=lambda e: e["time_to_target_s"])
    t_best = best["time_to_target_s"]
    for e in per_b.values():
        e["regret"] = e["time_to_target_s"] / t_best if e["time_to_target_s"] is not None else None
    quick_entry = per_b.get(quick_b) if quick_b else None
    summary.update(
        recommended_batch_size=best["batch_size"], recommended_lr=best["lr"],
        recommended_by="least measured time to target, S(B) x t(B)",
        time_to_target_s=t_best,
        within_10_percent=[e["batch_size"] for e in per_b.values() if e["regret"] is not None and e["regret"] <= 1.1],
        lr_at_edge=[e["batch_size"] for e in per_b.values() if e.get("lr_at_edge")],
        regret={str(b): per_b[b]["regret"] for b in grid},
        quick_regret=quick_entry["regret"] if quick_entry else None,
        batch_sizes=list(per_b.values()),
    )
    return summary
