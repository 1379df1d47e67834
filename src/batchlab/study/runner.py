"""One study from start to end: ``Study(...).run()`` checks the configuration, opens the folder, measures the
throughput, the noise scale and (unless quick) the LR sweeps, fits and recommends, writes the report and returns
the ``StudyResult``. ``batchlab study`` runs one from the command line; ``run_study`` from Python:

    from batchlab import run_study
    from batchlab.study import format_study

    result = run_study(model, datamodule, target=1.05, accelerator="cpu", quick=True, out="studies/x")
    print(format_study(result))
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional

import lightning
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from tqdm.auto import tqdm

from batchlab import scaling
from batchlab._lightning import runs_fits_in_this_process
from batchlab.errors import check
from batchlab.quiet import STARTUP_LINES, noise_dropped
from batchlab.runs import device_name, global_seed
from batchlab.study.fitting import STUDY_OWNED, Fitter, check_batch_size_holder, get_value
from batchlab.study.folder import StudyFolder
from batchlab.study.grid import batch_size_grid, memory_max, train_size
from batchlab.study.noise import measure_noise_scale
from batchlab.study.ranks import Ranks
from batchlab.study.recommendation import quick_b_star, summarise
from batchlab.study.report import write_report
from batchlab.study.results import FORMAT, StudyResult
from batchlab.study.search import search_all
from batchlab.study.settings import StudySettings
from batchlab.study.throughput import measure_throughput, monotone


class Study:
    """One batch-size study of a model and its data.

    Args:
        model: The model; every run starts from its initial weights.
        datamodule: The data; its batch size is the one the study sets (or the model's).
        trainer_kwargs: Trainer arguments (accelerator, devices, precision, strategy...); those the study sets
            itself for each run are left out.
        settings: What the study measures.
        seed: Every fit starts from it.
        config: The configuration as the command line gave it, for the folder's fingerprint; default: the
            classes and initial hyperparameters of the model and the data, and ``trainer_kwargs``.
    """

    def __init__(self, model: LightningModule, datamodule: LightningDataModule, trainer_kwargs: dict[str, Any],
                 settings: StudySettings, seed: int = 0, config: Optional[dict[str, Any]] = None) -> None:
        check(datamodule is not None, "the study needs a LightningDataModule (--data.class_path)")
        check_batch_size_holder(model, datamodule)
        # The noise scale differentiates the loss training_step returns; with manual optimization it returns none.
        check(model.automatic_optimization,
              f"{type(model).__name__} uses manual optimization: the study needs training_step to return the "
              "loss (automatic optimization) to measure the gradient noise scale")
        accumulate = trainer_kwargs.get("accumulate_grad_batches") or 1
        check(accumulate == 1, f"trainer.accumulate_grad_batches={accumulate} is not allowed in a study: its batch "
                               "size is the batch of one optimizer step; study that batch size directly")
        self.settings = settings
        self.fitter = Fitter(model, datamodule, trainer_kwargs, seed, settings.out)
        self.base_lr = settings.base_lr or float(get_value(self.fitter.lr_attr, model))
        self.base_batch_size = settings.base_batch_size or int(get_value("batch_size", model, datamodule))
        ranks = self.fitter.ranks
        if ranks.world_size > 1:
            named = trainer_kwargs.get("strategy")
            check(runs_fits_in_this_process(self.fitter.strategy),
                  f"strategy={named if isinstance(named, str) else type(self.fitter.strategy).__name__} is not "
                  f"allowed in a study on {ranks.world_size} devices: use ddp (each rank runs the study's fits in "
                  "turn, in its own process)")
            ranks.check_divisible("base_batch_size", self.base_batch_size if settings.base_batch_size else None)
            # The configured batch size is per device; the study's batch sizes are global.
            self.base_batch_size = settings.base_batch_size or self.base_batch_size * ranks.world_size
        # Measurements from another device or software stack are not comparable: they belong to another study.
        self.device = device_name(self.fitter.device)
        machine = {"device": self.device, "torch": torch.__version__, "lightning": lightning.__version__}
        if ranks.world_size > 1:  # where torchrun or SLURM set it, `devices` in the configuration may not show it
            machine["world_size"] = ranks.world_size
        self.fingerprint = {"format": FORMAT, "study": settings.fingerprint(seed),
                            "config": config or self._describe_objects(), "machine": machine}
        # The deciding trials' seeds: the study's own, then others far from any other study's (seed + 1000 k).
        self.seed = seed
        self.seeds = [seed + 1000 * k for k in range(settings.seeds)]
        self.folder: StudyFolder  # opened once the configuration has been checked
        self._bar: Optional[tqdm] = None

    def _describe_objects(self) -> dict[str, Any]:
        out = {"trainer": self.fitter.trainer_kwargs}
        for key, obj in (("model", self.fitter.model), ("data", self.fitter.datamodule)):
            out[key] = {"class_path": f"{type(obj).__module__}.{type(obj).__qualname__}",
                        "hparams": dict(getattr(obj, "hparams_initial", {}) or {})}
        return out

    @property
    def ranks(self) -> Ranks:
        return self.fitter.ranks

    def centre_lr(self, batch_size: int) -> float:
        """The centre of the LR grid at ``batch_size``, by the scaling rule."""
        ratio = batch_size / self.base_batch_size
        return self.base_lr * scaling.lr_factor(self.settings.lr_rule, ratio)

    def run(self) -> StudyResult:
        """Measure what the folder does not hold yet, recommend, and write the report (rank 0)."""
        with self.fitter.stopping_on_signals():
            result = self._measure()
        if self.ranks.is_global_zero:  # under DDP every rank holds the same results; one writes them
            write_report(result)
        return result

    def _measure(self) -> StudyResult:
        s, fitter, w = self.settings, self.fitter, self.ranks.world_size
        n_train = train_size(fitter)
        batch_size_grid(s, w, n_train, None)  # a bad --grid is refused before anything is written
        b_big = s.gns_batch_size or min(1024, n_train) // w * w
        check(2 * w <= b_big <= n_train, f"gns_batch_size={b_big} is not allowed: the noise scale needs full batches "
                                         f"of {2 * w} to {n_train} samples (the training set)")
        self.ranks.check_divisible("gns_batch_size", b_big)
        fitter.check_monitor(s.monitor)
        self.folder = StudyFolder.open(s.out, self.fingerprint, s.fresh, self.ranks)
        self.folder.meter = lambda: (fitter.fits, fitter.steps, fitter.samples)
        fitter.root = self.folder.root
        STARTUP_LINES.show()  # the study's input has passed its checks
        memory = memory_max(fitter, self.folder)
        grid = batch_size_grid(s, w, n_train, memory)
        total = len(grid) * s.throughput_rounds + 1 + (0 if s.quick else len(grid) * len(set(s.lr_factors)))  # then more
        self._bar = tqdm(total=total, desc="batchlab study", unit="run", dynamic_ncols=True,
                         disable=not self.ranks.is_global_zero)
        try:
            throughput = monotone(measure_throughput(self, grid))
            noise = measure_noise_scale(self, b_big)
            searcher = None
            if not s.quick:
                # The search starts where the quick answer points, so that a good time to target is known early.
                fit_t = scaling.fit_throughput([t.batch_size for t in throughput], [t.step_s for t in throughput])
                b_star = quick_b_star(noise, fit_t)
                start = scaling.nearest_in_grid(b_star, grid) if not math.isnan(b_star) else self.base_batch_size
                start = start if start in grid else scaling.nearest_in_grid(start, grid)
                searcher = search_all(self, grid, {t.batch_size: t.step_s for t in throughput}, start)
            fitter.check_stop()
        finally:
            self._bar.close()
        return summarise(self, grid, n_train, memory, throughput, noise, searcher)

    def tick(self) -> None:
        """One more run done (measured or read back): the progress bar moves, and a signal stops the study."""
        if self._bar is not None:
            self._bar.update(1)
        self.fitter.check_stop()

    def add_to_total(self, n: int) -> None:
        if self._bar is not None:
            self._bar.total += n
            self._bar.refresh()


def run_study(model: LightningModule, datamodule: Optional[LightningDataModule] = None, seed: Optional[int] = None,
              **options: Any) -> StudyResult:
    """Run a batch-size study from Python, as ``batchlab study`` does, into the same folder; returns its result
    (``batchlab.study.format_study(result)`` is what the command prints).

    Args:
        model: The model; every run starts from its initial weights.
        datamodule: The data.
        seed: The seed every fit starts from; default: the one ``seed_everything`` set, else 0.
        options: ``StudySettings`` fields (``target``, ``quick``, ``out``...) and Trainer arguments
            (``accelerator``, ``devices``, ``precision``, ``strategy``...), by name.
    """
    settings, trainer_kwargs = split_options(options)
    seed = seed if seed is not None else global_seed() or 0
    with noise_dropped():
        return Study(model, datamodule, trainer_kwargs, StudySettings(**settings), seed).run()


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` as (study settings, Trainer arguments); a name that is neither is a ``ConfigError``."""
    setting_names = list(inspect.signature(StudySettings).parameters)
    trainer_names = [n for n in inspect.signature(Trainer.__init__).parameters if n not in {"self", *STUDY_OWNED}]
    unknown = sorted(set(options) - set(setting_names) - set(trainer_names))
    check(not unknown, f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not allowed in run_study: use "
                       f"study settings ({', '.join(setting_names)}) or Trainer arguments the study does not set "
                       f"itself ({', '.join(trainer_names)})")
    settings = {k: v for k, v in options.items() if k in setting_names}
    return settings, {k: v for k, v in options.items() if k not in settings}
