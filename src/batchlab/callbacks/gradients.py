"""The gradient norms of a running fit that ``NoiseScaleMonitor`` turns into the noise scale: |G|^2 and tr(Sigma)
estimates (``scaling.NoiseSample``) at one optimizer step, by each estimator, for each view of the gradient
(``raw``; ``adam``: divided by Adam's sqrt(v_hat) + eps, where the optimizer has that state).

- ``per_example``: torch.func per-example gradients of the step's own batch (B_small = 1; under DDP B_big is the
  global batch, by one all-reduce). The most precise; needs a model torch.func can vmap.
- ``ranks``: under DDP, each rank's own gradient, read by a DDP communication hook before DDP averages it
  (B_small = the rank's batch, B_big = the global batch): no extra backward.
- ``micro_batches``: with ``accumulate_grad_batches > 1``, each micro-batch's gradient, the change in ``.grad``
  across its backward: no extra backward.
- ``two_batch``: one extra backward on the first half of the batch; on one device the other half's gradient is
  twice the step's gradient minus it, so both halves count.

The loss outside the step comes from ``LossProbe``: the module's own ``training_step`` on a copy that shares the
parameters and buffers but not the trainer, so its ``self.log`` calls and metric updates go nowhere; the RNG is
forked and the buffers restored around it, so the fit trains exactly as it would unmonitored. Written here
because no library estimates the noise scale inside a Lightning fit; the algebra is ``batchlab.scaling``'s.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from batchlab import scaling

Views = dict[str, scaling.Preconditioner]  # "raw": None; "adam": Adam's denominator per parameter
# Per-example gradients hold batch x parameters numbers: above this many, only the batch's first rows are used.
PER_EXAMPLE_BUDGET = 1 << 26


class LossProbe:
    """The module's mean training loss on a batch, computed beside the fit without changing it."""

    def __init__(self, pl_module: LightningModule, trainer: Trainer) -> None:
        self.live = pl_module
        shared: dict[int, Any] = {id(t): t for t in itertools.chain(pl_module.parameters(), pl_module.buffers())}
        shared[id(trainer)] = None  # the copy has no trainer: its self.log is a no-op
        self.module = copy.deepcopy(pl_module, memo=shared)
        self.n_params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

    def loss(self, batch: Any) -> Tensor:
        out = self.module.training_step(batch, 0)
        return out["loss"] if isinstance(out, Mapping) else out

    @contextmanager
    def aside(self) -> Iterator[None]:
        """Around computations beside the fit: the RNG streams forked, the buffers (batch-norm statistics)
        restored, Lightning's warning about logging without a trainer hidden."""
        buffers = [(b, b.detach().clone()) for b in self.live.buffers()]
        devices = [self.live.device] if self.live.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings(), torch.enable_grad():
            warnings.filterwarnings("ignore", message=".*self.log.*trainer.*reference is not registered")
            try:
                yield
            finally:
                with torch.no_grad():
                    for b, saved in buffers:
                        b.copy_(saved)


def flat_grad(pl_module: LightningModule, preconditioner: scaling.Preconditioner) -> Tensor:
    """The parameters' ``.grad`` as one vector (zeros where a parameter has none), divided by ``preconditioner``."""
    parts = []
    for n, p in pl_module.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if preconditioner and n in preconditioner:
            g = g / preconditioner[n].to(g.device)
        parts.append(g.detach().reshape(-1))
    return torch.cat(parts)


def per_example(probe: LossProbe, batch: tuple[Tensor, ...], views: Views, world_size: int,
                mean_over_ranks: Callable[[Tensor], Tensor]) -> dict[str, scaling.NoiseSample]:
    rows = max(2, min(len(batch[0]), PER_EXAMPLE_BUDGET // max(1, probe.n_params)))
    batch = tuple(t[:rows] for t in batch)
    with probe.aside():
        grads = scaling.per_example_grads(probe.module, probe.loss, batch)
    out = {}
    for view, pre in views.items():
        mean, example_sq = scaling.per_example_norms(grads, pre)
        if world_size > 1:
            out[view] = scaling.data_parallel_noise(mean, example_sq, 1, rows * world_size, mean_over_ranks)
        else:
            out[view] = scaling.estimate_from_norms(example_sq, mean.pow(2).sum().item(), 1, rows)
    return out


def two_batch(probe: LossProbe, batch: tuple[Tensor, ...], views: Views, world_size: int,
              mean_over_ranks: Callable[[Tensor], Tensor]) -> dict[str, scaling.NoiseSample]:
    """From the step's gradient (``.grad``: the global batch's under DDP) and one extra backward on the first half
    of this rank's batch."""
    b_local = len(batch[0])
    half = b_local // 2
    with probe.aside():
        params = [(n, p) for n, p in probe.live.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(probe.loss(tuple(t[:half] for t in batch)), [p for _, p in params],
                                    allow_unused=True)
    out = {}
    for view, pre in views.items():
        g_half = torch.cat([(torch.zeros_like(p) if g is None else
                             g / pre[n].to(g.device) if pre and n in pre else g).reshape(-1)
                            for (n, p), g in zip(params, grads)])
        g_step = flat_grad(probe.live, pre)
        if world_size == 1 and b_local == 2 * half:
            # The halves' gradients average to the step's: the other half's is 2 G - G_half, for free.
            small = (g_half.pow(2).sum() + (2 * g_step - g_half).pow(2).sum()).item() / 2
            out[view] = scaling.estimate_from_norms(small, g_step.pow(2).sum().item(), half, b_local)
        else:
            both = mean_over_ranks(g_half.pow(2).sum().reshape(1))
            out[view] = scaling.estimate_from_norms(both.item(), g_step.pow(2).sum().item(), half,
                                                    b_local * world_size)
    return out


class MicroBatches:
    """The micro-batches' own gradients within one accumulated optimizer step, from ``.grad`` after each backward
    (Lightning divides each micro-batch's loss by ``accumulate_grad_batches``, so each adds g_k / k to it)."""

    def __init__(self, views: Views, accumulate: int) -> None:
        self.views, self.accumulate = views, accumulate
        self.prev: dict[str, Tensor] = {}
        self.small_sq = dict.fromkeys(views, 0.0)
        self.count = 0

    def after_backward(self, pl_module: LightningModule) -> None:
        for view, pre in self.views.items():
            now = flat_grad(pl_module, pre)
            diff = now - self.prev[view] if view in self.prev else now
            self.small_sq[view] += (diff * self.accumulate).pow(2).sum().item()
            self.prev[view] = now
        self.count += 1

    def samples(self, micro_batch: int) -> Optional[dict[str, scaling.NoiseSample]]:
        if self.count != self.accumulate:  # a short last window of an epoch: its .grad is not a mean
            return None
        b_big = micro_batch * self.accumulate
        return {view: scaling.estimate_from_norms(self.small_sq[view] / self.count, g.pow(2).sum().item(),
                                                  micro_batch, b_big) for view, g in self.prev.items()}


class RankNorms:
    """Under DDP, each rank's squared gradient norms before the all-reduce, from a communication hook (a DDP model
    takes one: ``register``). The hook does DDP's own averaging all-reduce; it reads the buckets only on the steps
    being measured (``views`` set)."""

    def __init__(self, pl_module: LightningModule) -> None:
        self.names = {id(p): n for n, p in pl_module.named_parameters()}
        self.views: Optional[Views] = None
        self.local_sq: dict[str, Tensor] = {}

    def register(self, ddp_model: Any) -> None:
        ddp_model.register_comm_hook(self, _read_then_all_reduce)

    def start(self, views: Views) -> None:
        self.views, self.local_sq = views, {}

    def samples(self, pl_module: LightningModule, b_local: int, world_size: int,
                mean_over_ranks: Callable[[Tensor], Tensor]) -> Optional[dict[str, scaling.NoiseSample]]:
        views, self.views = self.views, None
        if not views or not self.local_sq:
            return None
        out = {}
        for view, pre in views.items():
            small = mean_over_ranks(self.local_sq[view].reshape(1)).item()
            out[view] = scaling.estimate_from_norms(small, flat_grad(pl_module, pre).pow(2).sum().item(), b_local,
                                                    b_local * world_size)
        return out


# No annotations on ``bucket`` and the return: DDP's ``register_comm_hook`` refuses a hook whose annotations are not
# exactly ``dist.GradBucket`` and ``Future[Tensor]``, and under ``from __future__ import annotations`` they are
# strings, so any annotation at all made registration fail (and ``auto`` silently go without this estimator).
def _read_then_all_reduce(state, bucket):  # (RankNorms, dist.GradBucket) -> Future[Tensor]
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    if state.views:
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            for view, pre in state.views.items():
                name = state.names.get(id(p))
                scaled = g / pre[name].to(g.device) if pre and name in pre else g
                sq = scaled.detach().pow(2).sum()
                state.local_sq[view] = state.local_sq[view] + sq if view in state.local_sq else sq
    return allreduce_hook(None, bucket)
