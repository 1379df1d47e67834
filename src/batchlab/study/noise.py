"""The gradient noise scale B_simple along a reference run: a fit at the base batch size and the centre LR,
whose weights are kept at ``--gns_points`` steps; at each, the noise estimates of ``batchlab.scaling`` on a few
large batches (``--gns_batch_size``). Per-example gradients where torch.func can vmap the model, gradient norms
at two batch sizes where it cannot, or where vmap would fall back to its slow path (an operator without a batching
rule, as CPU attention has: the two-batch estimate then costs as much or less, is as precise wherever the noise of
|G|^2 dominates, and prints no warning); the reason is kept beside the method. For an Adam-family optimizer the gradients are those Adam steps by, divided by
sqrt(v_hat) + eps from the reference run's own optimizer state at each point (``scaling.adam_preconditioner``);
for any other, the raw gradients. Under DDP the ranks' own gradients give a second estimate. One measurement in
the study's folder (``gns.json``).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.data import extract_batch_size
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from batchlab import scaling
from batchlab.errors import check
from batchlab.quiet import quiet_lightning
from batchlab.study.fitting import CurveRecorder, set_value
from batchlab.study.results import NoisePoint, NoiseScale

if TYPE_CHECKING:
    from batchlab.study.runner import Study

Samples = dict[str, list[scaling.NoiseSample]]


class Snapshots(Callback):
    """Keeps CPU copies of the weights at the given steps (and at the start) for the noise-scale estimates, with
    the optimizer's preconditioner there where it is Adam-family (None before its first step, or for others)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.states: list[tuple[int, dict[str, Tensor], scaling.Preconditioner]] = []

    def _keep(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        # Lightning's automatic optimization (which the study requires) steps one optimizer, or none.
        preconditioner = (scaling.adam_preconditioner(trainer.optimizers[0], pl_module.named_parameters())
                          if trainer.optimizers else None)
        if preconditioner is not None:
            preconditioner = {n: p.cpu() for n, p in preconditioner.items()}
        self.states.append((trainer.global_step, state, preconditioner))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._keep(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step in self.steps and trainer.global_step != self.states[-1][0]:
            self._keep(trainer, pl_module)


def measure_noise_scale(study: Study, b_big: int) -> NoiseScale:
    """The study's noise scale from its folder, or measured now with estimates on batches of ``b_big``."""
    noise = study.folder.measured("gns", lambda: _measure(study, b_big), NoiseScale.from_json)
    study.tick()
    return noise


def _measure(study: Study, b_big: int) -> NoiseScale:
    s = study.settings
    b_ref = study.base_batch_size
    every = max(1, s.gns_steps // (s.gns_points - 1))
    snapshots = Snapshots({every * k for k in range(1, s.gns_points)})
    recorder = CurveRecorder(s.monitor)
    callbacks: list[Callback] = [snapshots, recorder]
    if s.target is not None:
        callbacks.append(EarlyStopping(s.monitor, mode=s.mode, stopping_threshold=s.target, patience=10**9,
                                       check_finite=True, verbose=False))
    _, trainer = study.fitter.fit(b_ref, study.centre_lr(b_ref), callbacks, s.gns_steps, every)
    device = trainer.strategy.root_device
    batches = _noise_batches(study, b_big, device)
    probe = copy.deepcopy(study.fitter.model).to(device)
    curve = {p.step: p.value for p in recorder.curve}
    points, finite, method, why = [], {}, None, None
    for step, state, preconditioner in snapshots.states:
        probe.load_state_dict(state)
        estimates, method, not_per_example = _noise_samples(study, probe, batches, method, preconditioner)
        why = why or not_per_example
        if all(math.isfinite(x.g2) and math.isfinite(x.trace) for xs in estimates.values() for x in xs):
            finite[step] = estimates
        mean = {name: (sum(x.g2 for x in xs) / len(xs), sum(x.trace for x in xs) / len(xs), scaling.b_simple(xs))
                for name, xs in estimates.items()}
        ranks = mean.get("ranks") if method != "ranks" else None
        points.append(NoisePoint(step, step * b_ref, curve.get(step), *mean[method],
                                 *(ranks or (None, None, None)), preconditioned=preconditioner is not None))
    # The study's B_simple averages the points of training, not the initial weights: at step 0 |G|^2 is
    # typically orders of magnitude above its value anywhere later (the default study: 14,000 at step 0, 6-410
    # after), so pooling it in gave the initial weights' figure (0.72 against 2-125 later, B_crit 7.3). Step 0
    # stays in the trajectory; it is used alone only when no later point exists (a reference run that diverged
    # or reached the target before its first snapshot), which the answer then warns of.
    used = [p for p in points if p.step in finite and p.step > 0] or [p for p in points[:1] if p.step in finite]
    check(bool(used), "the noise scale's gradients are not finite even at the initial weights: check the model's "
                      "initialisation and its loss on the training data")
    pooled: Samples = {}
    for p in used:
        for name, samples in finite[p.step].items():
            pooled.setdefault(name, []).extend(samples)
    decay = 0.5
    g2_ema = scaling.ema([p.g2 for p in used], decay)
    trace_ema = scaling.ema([p.trace for p in used], decay)
    emas = {p.step: t / g if g > 0 else math.inf for p, g, t in zip(used, g2_ema, trace_ema)}
    for p in points:
        p.b_simple_ema = emas.get(p.step)
    w = study.fitter.ranks.world_size
    return NoiseScale(
        b_simple=scaling.b_simple(pooled[method]), method=method,
        # The points averaged are all past the first step (Adam has its state at each) or step 0 alone (it has none).
        preconditioner="adam" if all(p.preconditioned for p in used) else "none", reference_batch_size=b_ref,
        reference_lr=study.centre_lr(b_ref), estimate_batch_size=b_big, batches_per_point=len(batches),
        averaged_steps=[p.step for p in used], reference_diverged_at=recorder.diverged_at, points=points,
        method_reason=why, rank_batch_size=b_big // w if w > 1 else None,
        b_simple_ranks=scaling.b_simple(pooled["ranks"]) if w > 1 else None,
    )


def _noise_batches(study: Study, b_big: int, device: torch.device) -> list[Any]:
    data = copy.deepcopy(study.fitter.datamodule)
    set_value("batch_size", b_big, data)
    with torch.random.fork_rng(devices=[]), quiet_lightning():
        torch.manual_seed(study.fitter.seed + 1)
        data.setup("fit")
        batches = []
        for batch in data.train_dataloader():
            if extract_batch_size(batch) == b_big:
                batches.append(move_data_to_device(batch, device))
            if len(batches) == study.settings.gns_batches:
                break
    check(bool(batches), f"no full training batch of {b_big} samples for the noise scale: lower --gns_batch_size")
    return batches


def _noise_samples(study: Study, probe: LightningModule, batches: list[Any], method: Optional[str],
                   preconditioner: scaling.Preconditioner) -> tuple[Samples, str, Optional[str]]:
    """Noise estimates from each batch, by method, each gradient divided by ``preconditioner`` where there is one;
    the method the study uses is returned beside them, and why per-example gradients were not, where they were
    tried and failed."""
    def loss_fn(batch: Any) -> Tensor:
        out = probe.training_step(batch, 0)
        return out["loss"] if isinstance(out, dict) else out

    why = None
    with quiet_lightning(), torch.enable_grad():
        if study.fitter.ranks.world_size > 1:
            return _data_parallel_samples(study, probe, loss_fn, batches, method, preconditioner)
        if method in (None, "per_example") and all(_tensor_tuple(b) for b in batches):
            try:
                return {"per_example": [scaling.per_example_noise(probe, loss_fn, tuple(b), preconditioner)
                                        for b in batches]}, "per_example", None
            except Exception as err:  # noqa: BLE001 - any model torch.func cannot vmap falls back to plain autograd
                if method == "per_example":
                    raise
                why = scaling.why_not_per_example(err)
        b_big = extract_batch_size(batches[0])
        b_small = max(1, b_big // 16)
        return {"two_batch": [scaling.two_batch_noise(probe, loss_fn, _as_tuple(b), b_small, preconditioner)
                              for b in batches]}, "two_batch", why


def _data_parallel_samples(study: Study, probe: LightningModule, loss_fn: Any, batches: list[Any],
                           method: Optional[str], preconditioner: scaling.Preconditioner,
                           ) -> tuple[Samples, str, Optional[str]]:
    """Under DDP each rank differentiates its own slice of every batch. The ranks' gradient norms give the
    estimate DDP gets for free (``ranks``: B_small = one rank's batch, B_big = the global batch); where
    torch.func can vmap the model, per-example gradients on each rank give the study's estimate, the same as
    one device's per-example estimate of the global batch: the ranks' estimate is far noisier (its relative
    error per batch is about 2 sqrt(2 B_small / B_simple)), so it is kept beside it."""
    ranks = study.fitter.ranks
    w, rank = ranks.world_size, ranks.rank
    b_big = extract_batch_size(batches[0])
    b_local = b_big // w

    def mean_over_ranks(t: Tensor) -> Tensor:
        return ranks.strategy.reduce(t, reduce_op="mean")

    out: Samples = {"ranks": [], "per_example": []}
    # Whether vmap works is the same on every rank (the same model and batches), so every rank takes the same
    # collectives.
    per_example = method in (None, "per_example") and all(_tensor_tuple(b) for b in batches)
    why = None
    for batch in batches:
        local = _rows(batch, rank * b_local, (rank + 1) * b_local)
        if per_example:
            try:
                grad, example_sq = scaling.per_example_gradients(probe, loss_fn, tuple(local), preconditioner)
            except Exception as err:  # noqa: BLE001 - as on one device, fall back to plain autograd
                if method == "per_example":
                    raise
                per_example, why = False, scaling.why_not_per_example(err)
        if per_example:
            out["per_example"].append(scaling.data_parallel_noise(grad, example_sq, 1, b_big, mean_over_ranks))
        else:
            grad = scaling.local_gradient(probe, loss_fn, local, preconditioner)
        out["ranks"].append(scaling.data_parallel_noise(grad, grad.pow(2).sum().item(), b_local, b_big,
                                                        mean_over_ranks))
    if not per_example:
        del out["per_example"]
    return out, "per_example" if per_example else "ranks", why


def _rows(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in a batch (of any nesting)."""
    return apply_to_collection(batch, Tensor, lambda t: t[start:stop])


def _tensor_tuple(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and all(isinstance(t, Tensor) for t in batch)


def _as_tuple(batch: Any) -> tuple[Any, ...]:
    check(_tensor_tuple(batch), "the two-batch noise estimate needs batches that are tuples of tensors")
    return tuple(batch)
