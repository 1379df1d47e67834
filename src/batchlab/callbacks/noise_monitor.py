"""``NoiseScaleMonitor``: the gradient noise scale B_simple = tr(Sigma) / |G|^2 during any Lightning fit.

    batchlab fit -c configs/seed.yaml -c configs/noise_scale.yaml
    batchlab fit ... --trainer.callbacks+ batchlab.callbacks.NoiseScaleMonitor --trainer.callbacks.every_n_steps 20
    Trainer(callbacks=[NoiseScaleMonitor()])

Every ``every_n_steps`` optimizer steps it measures |G|^2 and tr(Sigma) on that step's batch with the best
estimator the fit allows (``callbacks.gradients``), keeps bias-corrected exponential averages of the two
separately, and logs ``noise_scale/grad_sq``, ``noise_scale/trace`` and their ratio ``noise_scale/b_simple`` to
the run's loggers at that step. For an Adam-family optimizer it also logs the same three of the preconditioned
gradient (suffix ``_adam``), the gradient Adam steps by; ``b_simple`` (the property) is that one where it exists,
as the study's is. B_simple estimates the critical batch size (McCandlish et al. 2018): ``BatchSizeWarmup`` grows
the batch by it. The fit trains exactly as it would without the monitor (tests/test_callbacks.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor

from batchlab import scaling
from batchlab.callbacks import gradients
from batchlab.errors import ConfigError, Fraction, PositiveInt, check_arguments

Estimator = Literal["auto", "per_example", "ranks", "micro_batches", "two_batch"]


@dataclass
class NoiseReading:
    """The monitor's averages after one measurement: step, samples seen (all ranks), the estimator, and |G|^2,
    tr(Sigma) and B_simple of the raw gradient and, for Adam-family optimizers, of the preconditioned one."""

    step: int
    samples: int
    method: str
    grad_sq: float
    trace: float
    b_simple: float
    grad_sq_adam: Optional[float] = None
    trace_adam: Optional[float] = None
    b_simple_adam: Optional[float] = None
    # This step's own estimates, before averaging (unbiased each, noisy alone).
    step_grad_sq: Optional[float] = None
    step_trace: Optional[float] = None
    step_grad_sq_adam: Optional[float] = None
    step_trace_adam: Optional[float] = None


class _Average:
    """Bias-corrected exponential averages of |G|^2 and tr(Sigma), kept apart and divided only when read."""

    def __init__(self, decay: float) -> None:
        self.decay, self.g2, self.trace, self.n = decay, 0.0, 0.0, 0

    def add(self, sample: scaling.NoiseSample) -> tuple[float, float, float]:
        self.n += 1
        self.g2 = self.decay * self.g2 + (1 - self.decay) * sample.g2
        self.trace = self.decay * self.trace + (1 - self.decay) * sample.trace
        correction = 1 - self.decay**self.n
        g2, trace = self.g2 / correction, self.trace / correction
        return g2, trace, trace / g2 if g2 > 0 else math.inf


class NoiseScaleMonitor(Callback):
    """Log the gradient noise scale of a running fit (see the module's docstring).

    Args:
        every_n_steps: Measure every this many optimizer steps.
        decay: Weight of the past in the exponential averages of |G|^2 and tr(Sigma) (per measurement).
        estimator: ``auto`` takes the best the fit allows: per-example gradients where torch.func can vmap the
            model, else the ranks' gradients under DDP, else the micro-batches' with accumulate_grad_batches > 1,
            else one extra backward on half the batch (``two_batch``).
        preconditioned: Also measure the gradient divided by Adam's sqrt(v_hat) + eps. None: where the optimizer
            is Adam-family; True: required (an error before training where the optimizer has no such state).
    """

    def __init__(self, every_n_steps: PositiveInt = 50, decay: Fraction = 0.9, estimator: Estimator = "auto",
                 preconditioned: Optional[bool] = None) -> None:
        check_arguments(NoiseScaleMonitor.__init__, locals())
        self.every_n_steps, self.decay, self.estimator, self.preconditioned = (every_n_steps, decay, estimator,
                                                                              preconditioned)
        self.readings: list[NoiseReading] = []
        self.method: Optional[str] = None
        self.method_reason: Optional[str] = None  # why per-example gradients were not used, where they were tried
        self.samples_seen = 0

    def b_simple_since(self, index: int, margin: float = 0.0) -> Optional[float]:
        """B_simple from the readings from ``index`` on alone (their own estimates' means, divided), of the
        preconditioned gradient where all of them have one: what the warmup decides by, so that each change rests
        on measurements made at the batch size it grows from, not on an average that still holds smaller ones'.
        With ``margin`` > 0, the mean |G|^2 is raised by that many standard errors first (the noise of B_simple
        is mostly that of |G|^2 at batches below it): a B_simple the measurements are that sure it exceeds."""
        fresh = self.readings[index:]
        if not fresh:
            return None
        adam = all(r.step_grad_sq_adam is not None for r in fresh)
        g2s = [r.step_grad_sq_adam if adam else r.step_grad_sq for r in fresh]
        g2 = sum(g2s) / len(g2s)
        trace = sum(r.step_trace_adam if adam else r.step_trace for r in fresh) / len(fresh)
        if margin and len(g2s) > 1:
            g2 += margin * math.sqrt(sum((x - g2) ** 2 for x in g2s) / (len(g2s) - 1) / len(g2s))
        return trace / g2 if g2 > 0 else math.inf

    @property
    def b_simple(self) -> Optional[float]:
        """The latest B_simple: of the preconditioned gradient where there is one, else of the raw gradient."""
        if not self.readings:
            return None
        last = self.readings[-1]
        return last.b_simple_adam if last.b_simple_adam is not None else last.b_simple

    # Setup: what the fit allows, checked before training.
    def check_fit(self, trainer: Trainer, pl_module: LightningModule, optimizers: list[Any]) -> bool:
        """Raise ``ConfigError`` where this fit cannot be monitored as configured; returns whether the optimizer is
        Adam-family. ``batchlab.preflight`` calls it before anything is written, ``on_fit_start`` again."""
        if not pl_module.automatic_optimization:
            raise ConfigError("NoiseScaleMonitor needs Lightning's automatic optimization: the module sets "
                              "automatic_optimization = False")
        world, accumulate = trainer.world_size, trainer.accumulate_grad_batches
        if self.estimator == "ranks" and world < 2:
            raise ConfigError("NoiseScaleMonitor estimator=ranks needs DDP on 2 or more devices; this fit runs on "
                              f"{world}: use estimator auto")
        if self.estimator == "micro_batches" and accumulate < 2:
            raise ConfigError("NoiseScaleMonitor estimator=micro_batches needs accumulate_grad_batches >= 2; it is "
                              f"{accumulate}: use estimator auto")
        readable = bool(optimizers) and all("betas" in g and "eps" in g for g in optimizers[0].param_groups)
        if self.preconditioned and not readable:
            name = type(optimizers[0]).__name__ if optimizers else "no optimizer"
            raise ConfigError(f"NoiseScaleMonitor preconditioned=true needs an Adam-family optimizer (betas and eps "
                              f"in its param groups, exp_avg_sq in its state); the model's is {name}: use "
                              "preconditioned null or false")
        return readable

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        readable = self.check_fit(trainer, pl_module, trainer.optimizers)
        self._adam = readable and self.preconditioned is not False
        self._averages = {"raw": _Average(self.decay), "adam": _Average(self.decay)}
        self._measuring = False
        self._batch: Any = None
        self._micro: Optional[gradients.MicroBatches] = None
        self._ranks: Optional[gradients.RankNorms] = None
        self._probe: Optional[gradients.LossProbe] = None
        self._tried_per_example = self.estimator not in ("auto", "per_example")
        self._restore()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = True
        if trainer.world_size > 1 and self.estimator in ("auto", "ranks"):
            ranks = gradients.RankNorms(pl_module)
            try:
                ranks.register(trainer.strategy.model)
                self._ranks = ranks
            except Exception as err:  # noqa: BLE001 - a DDP model takes one hook: the user's own comes first
                if self.estimator == "ranks":
                    raise ConfigError(f"NoiseScaleMonitor estimator=ranks could not hook DDP's all-reduce ({err}): "
                                      "drop the strategy's ddp_comm_hook, or use estimator auto") from None

    # Each step: choose, measure, average, log.
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._started:
            return  # a batch-size finder's trials, in on_fit_start before this callback's: not the fit
        step = trainer.global_step
        measuring = (step + 1) % self.every_n_steps == 0
        if measuring and not self._measuring:  # the first micro-batch of a measured step
            self._views = self._views_now(trainer, pl_module)
            if self._ranks is not None:
                self._ranks.start(self._views)
            if trainer.accumulate_grad_batches > 1:
                self._micro = gradients.MicroBatches(self._views, trainer.accumulate_grad_batches)
        self._measuring = measuring
        self._batch = batch if measuring else None

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._measuring and self._micro is not None:
            self._micro.after_backward(pl_module)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not self._measuring:
            return
        self._measuring = False
        samples = self._measure(trainer, pl_module)
        self._micro = None
        if self._ranks is not None:
            # The hook has read this step; where another estimator measured, nothing else stops it reading (and
            # summing norms of) every later step's buckets too.
            self._ranks.views = None
        if samples is not None:
            self._record(trainer, samples)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._started:
            return
        self.samples_seen += _rows(batch) * trainer.world_size

    def _views_now(self, trainer: Trainer, pl_module: LightningModule) -> gradients.Views:
        views: gradients.Views = {"raw": None}
        if self._adam and trainer.optimizers:
            pre = scaling.adam_preconditioner(trainer.optimizers[0], pl_module.named_parameters())
            if pre is not None:  # Adam has state once it has stepped
                views["adam"] = pre
        return views

    def _mean_over_ranks(self, trainer: Trainer) -> Any:
        return lambda t: trainer.strategy.reduce(t, reduce_op="mean")

    def _measure(self, trainer: Trainer, pl_module: LightningModule) -> Optional[dict[str, scaling.NoiseSample]]:
        world, reduce = trainer.world_size, self._mean_over_ranks(trainer)
        batch = self._batch
        tensors = isinstance(batch, (tuple, list)) and all(isinstance(t, Tensor) for t in batch)
        if not self._tried_per_example or self.method == "per_example":
            self._tried_per_example = True
            if tensors:
                try:
                    out = gradients.per_example(self._probe_for(trainer, pl_module), tuple(batch), self._views,
                                                world, reduce)
                    self.method = "per_example"
                    return out
                except ConfigError:
                    raise
                except Exception as err:  # noqa: BLE001 - any model torch.func cannot vmap takes the next estimator
                    why = scaling.why_not_per_example(err)
                    if self.estimator == "per_example":
                        raise ConfigError(f"NoiseScaleMonitor estimator=per_example: {why}; use estimator "
                                          "auto") from None
                    self.method_reason = why
            else:
                self.method_reason = "per-example gradients need batches that are tuples of tensors"
        if self._ranks is not None and self.estimator in ("auto", "ranks"):
            self.method = "ranks"
            b_local = _rows(batch) * trainer.accumulate_grad_batches
            return self._ranks.samples(pl_module, b_local, world, reduce)
        if self._micro is not None and self.estimator in ("auto", "micro_batches"):
            self.method = "micro_batches"
            return self._micro.samples(_rows(batch))
        if not tensors or _rows(batch) < 2:
            return None
        self.method = "two_batch"
        return gradients.two_batch(self._probe_for(trainer, pl_module), tuple(batch), self._views, world, reduce)

    def _probe_for(self, trainer: Trainer, pl_module: LightningModule) -> gradients.LossProbe:
        if self._probe is None:
            self._probe = gradients.LossProbe(pl_module, trainer)
        return self._probe

    def _record(self, trainer: Trainer, samples: dict[str, scaling.NoiseSample]) -> None:
        raw = self._averages["raw"].add(samples["raw"])
        adam = self._averages["adam"].add(samples["adam"]) if "adam" in samples else None
        reading = NoiseReading(trainer.global_step, self.samples_seen, self.method or "", *raw, *(adam or ()))
        reading.step_grad_sq, reading.step_trace = samples["raw"].g2, samples["raw"].trace
        if "adam" in samples:
            reading.step_grad_sq_adam, reading.step_trace_adam = samples["adam"].g2, samples["adam"].trace
        self.readings.append(reading)
        self._log(trainer, reading)

    @rank_zero_only
    def _log(self, trainer: Trainer, r: NoiseReading) -> None:
        metrics = {"noise_scale/b_simple": r.b_simple, "noise_scale/grad_sq": r.grad_sq,
                   "noise_scale/trace": r.trace}
        if r.b_simple_adam is not None:
            metrics.update({"noise_scale/b_simple_adam": r.b_simple_adam, "noise_scale/grad_sq_adam": r.grad_sq_adam,
                            "noise_scale/trace_adam": r.trace_adam})
        metrics = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"averages": {k: [a.g2, a.trace, a.n] for k, a in getattr(self, "_averages", {}).items()},
                "samples_seen": self.samples_seen, "method": self.method}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restored: Optional[dict[str, Any]] = None
        self._started, self._measuring = False, False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after ``setup`` and before ``on_fit_start``, which applies this.
        self._restored = state_dict

    def _restore(self) -> None:
        restored, self._restored = getattr(self, "_restored", None), None
        if restored:  # a resumed fit: the averages go on from where the checkpoint left them
            for k, (g2, trace, n) in restored.get("averages", {}).items():
                a = self._averages[k]
                a.g2, a.trace, a.n = g2, trace, n
            self.samples_seen = restored.get("samples_seen", 0)
            self.method = restored.get("method")


def _rows(batch: Any) -> int:
    # Every step: the common case without Lightning's general (and slower) walk over the batch.
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return len(batch[0])
    return extract_batch_size(batch)
