"""The science of the batch-size study: gradient noise scale estimators and the fits that turn measurements into
a recommendation. Pure functions on tensors and numbers; ``batchlab.study`` runs the measurements.

- McCandlish et al. 2018, "An Empirical Model of Large-Batch Training": steps to a given loss follow
  S(B) = S_min (1 + B_crit / B), examples E = B S, B_crit = E_min / S_min, and the simple noise scale
  B_simple = tr(Sigma) / |G|^2 predicts B_crit. With gradients of the mean loss over batches of B_small and B_big
  examples, E|G_B|^2 = |G|^2 + tr(Sigma) / B gives the unbiased estimates
  |G|^2 ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small) and
  tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big); per-example gradients are B_small = 1.
  Numerators and denominators are averaged separately, then divided.
- For Adam-family optimizers the step is the gradient divided elementwise by P = sqrt(v_hat) + eps (v_hat the
  bias-corrected second moment), so the noise that matters is that of the preconditioned gradient: every
  estimator takes an optional ``preconditioner`` (P per parameter, ``adam_preconditioner``) and divides each
  gradient by it before taking norms, as AdaptDL's ``AdamGradientNoiseScale`` does (Qiao et al. 2021, Pollux).
- With time per step t(B) = alpha + beta B, time to target T(B) = S(B) t(B) is least at
  B* = sqrt(B_crit alpha / beta).

Written here because no library computes these: they are a few lines of algebra on gradient norms.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn


@dataclass
class NoiseSample:
    """One unbiased estimate of |G|^2 (``g2``) and tr(Sigma) (``trace``) from one batch."""

    g2: float
    trace: float


def estimate_from_norms(g2_small: float, g2_big: float, b_small: int, b_big: int) -> NoiseSample:
    """Unbiased |G|^2 and tr(Sigma) from the squared norms of mean-loss gradients at two batch sizes."""
    if not b_big > b_small >= 1:
        raise ValueError(f"need b_big > b_small >= 1, got b_small={b_small}, b_big={b_big}")
    g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
    trace = (g2_small - g2_big) / (1 / b_small - 1 / b_big)
    return NoiseSample(g2, trace)


def b_simple(samples: Sequence[NoiseSample]) -> float:
    """B_simple = mean tr(Sigma) / mean |G|^2, averaged separately as McCandlish et al. recommend; ``inf`` when the
    mean |G|^2 estimate is not positive (the gradient is lost in the noise)."""
    g2 = sum(s.g2 for s in samples) / len(samples)
    trace = sum(s.trace for s in samples) / len(samples)
    return trace / g2 if g2 > 0 else math.inf


def ema(values: Sequence[float], decay: float) -> list[float]:
    """Exponential moving averages of ``values`` (bias-corrected, as Adam's are)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay**i))
    return out


LossFn = Callable[[Any], Tensor]
# What each parameter's gradient is divided by before its norm is taken, by parameter name; None: raw gradients.
Preconditioner = Optional[dict[str, Tensor]]


def adam_preconditioner(optimizer: torch.optim.Optimizer,
                        named_parameters: Iterable[tuple[str, nn.Parameter]]) -> Preconditioner:
    """P = sqrt(v_hat) + eps per parameter, Adam's denominator, from an Adam-family optimizer's own state
    (``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad, bias-corrected by 1 - beta2^step as torch.optim's Adam,
    AdamW, NAdam and RAdam do); a parameter it has not stepped keeps its raw gradient. None for any other
    optimizer, or one that has not stepped yet: the raw gradients are then the ones to measure."""
    names = {id(p): n for n, p in named_parameters}
    out = {}
    for group in optimizer.param_groups:
        if "betas" not in group or "eps" not in group:
            return None
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            v = state.get("max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq")
            if v is not None and id(p) in names:
                correction = 1 - beta2 ** float(state["step"])
                out[names[id(p)]] = (v.detach().sqrt() / math.sqrt(correction)).add_(eps)
    return out or None


def _divided(grads: dict[str, Tensor], preconditioner: Preconditioner) -> dict[str, Tensor]:
    if not preconditioner:
        return grads
    return {n: g / preconditioner[n].to(g.device) if n in preconditioner else g for n, g in grads.items()}


def per_example_noise(module: nn.Module, loss_fn: LossFn, batch: tuple[Tensor, ...],
                      preconditioner: Preconditioner = None) -> NoiseSample:
    """|G|^2 and tr(Sigma) from the per-example gradients of one batch (B_small = 1, B_big = len(batch)), each
    divided by ``preconditioner`` first where one is given.

    ``loss_fn(batch)`` returns the mean loss of a batch, computed with ``module``'s parameters; per-example
    gradients come from ``torch.func.vmap`` over ``torch.func.grad``. Raises whatever torch.func raises where the
    model cannot be vmapped (batch norm in training mode, data-dependent control flow...) or where vmap would
    fall back to its slow path (``refusing_vmap_fallback``).
    """
    mean_grad, per_example_sq = per_example_gradients(module, loss_fn, batch, preconditioner)
    return estimate_from_norms(per_example_sq, mean_grad.pow(2).sum().item(), 1, len(batch[0]))


def per_example_gradients(module: nn.Module, loss_fn: LossFn, batch: tuple[Tensor, ...],
                          preconditioner: Preconditioner = None) -> tuple[Tensor, float]:
    """The batch's mean gradient (one flat vector) and the mean squared norm of its per-example gradients, each
    divided by ``preconditioner`` where one is given."""
    return per_example_norms(per_example_grads(module, loss_fn, batch), preconditioner)


def per_example_grads(module: nn.Module, loss_fn: LossFn, batch: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """Each example's gradient, by parameter name (shape: batch x parameter), from ``torch.func.vmap`` over
    ``torch.func.grad``; ``module``'s own parameters and ``.grad`` are left as they were."""
    from torch.func import functional_call, grad, vmap

    wrapper = _LossModule(module, loss_fn)
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in module.named_buffers()}

    def example_loss(p: dict[str, Tensor], *example: Tensor) -> Tensor:
        inner = {f"inner.{n}": t for n, t in {**p, **buffers}.items()}
        return functional_call(wrapper, inner, args=(tuple(t.unsqueeze(0) for t in example),))

    with refusing_vmap_fallback():
        return vmap(grad(example_loss), in_dims=(None, *([0] * len(batch))))(params, *batch)


def per_example_norms(grads: dict[str, Tensor], preconditioner: Preconditioner = None) -> tuple[Tensor, float]:
    """From per-example gradients (``per_example_grads``), each divided by ``preconditioner`` where one is given:
    their mean (one flat vector) and the mean of their squared norms."""
    grads = _divided(grads, preconditioner)
    per_example_sq = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())  # |g_i|^2, shape (B,)
    return torch.cat([g.mean(0).reshape(-1) for g in grads.values()]), per_example_sq.mean().item()


@contextmanager
def refusing_vmap_fallback() -> Iterator[None]:
    """Inside the block, an operator torch.func has no batching rule for (CPU scaled-dot-product attention in
    torch 2.13, say) raises instead of running vmap's fallback, which calls that operator once per example and
    warns once per operator: per-example gradients then cost as much as the two-batch estimate or more (the chars
    example's, 1.2x at 1,024 sequences; far more where many operators lack a rule), for a B_simple no more
    precise where the noise of |G|^2 dominates.

    torch.func has no public switch for this: ``torch._C._functorch._set_vmap_fallback_enabled`` is private
    (pinned by tests/test_scaling.py); a torch without it runs the fallback as before.
    """
    functorch = torch._C._functorch
    if not hasattr(functorch, "_set_vmap_fallback_enabled"):
        yield
        return
    was = functorch._is_vmap_fallback_enabled()
    functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        functorch._set_vmap_fallback_enabled(was)


def why_not_per_example(err: Exception) -> str:
    """Why per-example gradients were not used, in a line. The estimator is chosen the same whatever the
    message says: its text only words the report."""
    lines = str(err).strip().splitlines()
    first = lines[0][:200] if lines else type(err).__name__
    slow = re.search(r"(aten::\w+) hit the vmap fallback", first)
    if slow:
        return (f"torch.func has no batching rule for {slow.group(1)}, so per-example gradients would run vmap's "
                "slow fallback")
    return f"torch.func cannot vmap the model ({type(err).__name__}: {first})"


class _LossModule(nn.Module):
    """Holds ``module`` so that ``functional_call`` can swap its parameters under an arbitrary loss function."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = module
        self.loss_fn = loss_fn

    def forward(self, batch: tuple[Tensor, ...]) -> Tensor:
        return self.loss_fn(batch)


def two_batch_noise(module: nn.Module, loss_fn: LossFn, batch: tuple[Tensor, ...], b_small: int,
                    preconditioner: Preconditioner = None) -> NoiseSample:
    """|G|^2 and tr(Sigma) from the gradient norm of a whole batch (B_big) and of its chunks of ``b_small``, each
    gradient divided by ``preconditioner`` first where one is given.

    Needs only ordinary autograd, so it works for any model; this is what data parallelism gives for free, with
    the per-device batch as B_small.
    """
    b_big = len(batch[0])

    def sq_norm(part: tuple[Tensor, ...]) -> float:
        return local_gradient(module, loss_fn, part, preconditioner).pow(2).sum().item()

    chunks = [tuple(t[i : i + b_small] for t in batch) for i in range(0, b_big - b_small + 1, b_small)]
    g2_small = sum(sq_norm(c) for c in chunks) / len(chunks)
    return estimate_from_norms(g2_small, sq_norm(batch), b_small, b_big)


def local_gradient(module: nn.Module, loss_fn: LossFn, batch: Any, preconditioner: Preconditioner = None) -> Tensor:
    """The gradient of ``loss_fn(batch)`` over ``module``'s trainable parameters, as one flat vector (divided by
    ``preconditioner`` where one is given)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(batch), [p for _, p in named])
    return torch.cat([g.reshape(-1) for g in _divided({n: g for (n, _), g in zip(named, grads)},
                                                      preconditioner).values()])


def data_parallel_noise(local_grad: Tensor, local_small_sq: float, b_small: int, b_big: int,
                        all_reduce_mean: Callable[[Tensor], Tensor]) -> NoiseSample:
    """|G|^2 and tr(Sigma) under data parallelism, B_big being all ranks' batches together.

    Each rank passes the mean gradient of its own batch and the mean squared norm of gradients at ``b_small``
    within it: with B_small = the rank's batch, ``|local_grad|^2`` itself (the norms DDP has before its
    all-reduce); with per-example gradients, B_small = 1. ``all_reduce_mean`` averages a tensor over the ranks,
    as DDP does to gradients every step; one collective gives the global mean gradient (|G_big|^2) and the mean
    of the small-batch norms (|G_small|^2) together.
    """
    both = all_reduce_mean(torch.cat([local_grad, local_grad.new_tensor([local_small_sq])]))
    return estimate_from_norms(both[-1].item(), both[:-1].pow(2).sum().item(), b_small, b_big)


@dataclass
class ScalingFit:
    """S(B) = s_min (1 + b_crit / B), from steps-to-target measurements."""

    s_min: float
    e_min: float
    b_crit: float

    def steps(self, b: float) -> float:
        return self.s_min * (1 + self.b_crit / b)


@dataclass
class LogScalingFit(ScalingFit):
    """S(B) fitted in log space: the residuals log(measured / fitted) per point, their root mean square and, where
    the points' standard errors were given, chi^2 per degree of freedom (about 1 where the model describes them)."""

    residuals: list[float]
    rms: float
    chi2_per_dof: Optional[float]


def fit_steps_log(batch_sizes: Sequence[float], steps: Sequence[float],
                  errors: Optional[Sequence[float]] = None) -> Optional[LogScalingFit]:
    """Weighted least squares of log S = log S_min + log(1 + B_crit / B), weights 1 / error^2 (``errors``: the
    standard errors of log S; equal weights without them).

    In log space every point counts by its relative error, so the many points of a plateau do not pull the fit
    away from the few of the 1/B regime, as a fit of S itself lets them. For a given B_crit the best log S_min is a
    weighted mean, so the fit scans B_crit (0, and a log grid from 1/1000 of the smallest B to 1000 x the largest)
    and refines the best by golden section. Returns None with fewer than two distinct batch sizes.
    """
    pts = [(float(b), math.log(s), e) for b, s, e in zip(batch_sizes, steps, errors or [None] * len(steps))
           if s > 0 and b > 0]
    if len({b for b, _, _ in pts}) < 2:
        return None
    weights = [1.0 / e**2 if errors else 1.0 for _, _, e in pts]

    def solve(b_crit: float) -> tuple[float, float]:
        shape = [math.log1p(b_crit / b) for b, _, _ in pts]
        log_s_min = sum(w * (y - f) for w, (_, y, _), f in zip(weights, pts, shape)) / sum(weights)
        loss = sum(w * (y - log_s_min - f) ** 2 for w, (_, y, _), f in zip(weights, pts, shape))
        return loss, log_s_min

    lo, hi = math.log(min(b for b, _, _ in pts) / 1000), math.log(max(b for b, _, _ in pts) * 1000)
    scan = [0.0] + [math.exp(lo + (hi - lo) * i / 400) for i in range(401)]
    b_crit = min(scan, key=lambda c: solve(c)[0])
    if b_crit > 0:  # refine between the scan's neighbours, in log B_crit
        a, c = math.log(b_crit) - (hi - lo) / 400, math.log(b_crit) + (hi - lo) / 400
        g = (math.sqrt(5) - 1) / 2
        for _ in range(60):
            x1, x2 = c - g * (c - a), a + g * (c - a)
            if solve(math.exp(x1))[0] < solve(math.exp(x2))[0]:
                c = x2
            else:
                a = x1
        refined = math.exp((a + c) / 2)
        b_crit = refined if solve(refined)[0] <= solve(b_crit)[0] else b_crit
    _, log_s_min = solve(b_crit)
    s_min = math.exp(log_s_min)
    residuals = [y - log_s_min - math.log1p(b_crit / b) for b, y, _ in pts]
    rms = math.sqrt(sum(r * r for r in residuals) / len(residuals))
    dof = len(pts) - 2
    chi2 = (sum((r / e) ** 2 for r, (_, _, e) in zip(residuals, pts)) / dof) if errors and dof > 0 else None
    return LogScalingFit(s_min, s_min * b_crit, b_crit, residuals, rms, chi2)


@dataclass
class ThroughputFit:
    """Time per optimizer step t(B) = alpha + beta B, in seconds."""

    alpha: float
    beta: float

    def step_time(self, b: float) -> float:
        return self.alpha + self.beta * b


_NEGLIGIBLE = 1e-9  # a fitted term below this fraction of the other is rounding noise


def _one_term(column: Tensor, rhs: Tensor) -> float:
    return float((column @ rhs) / (column @ column))


def fit_throughput(batch_sizes: Sequence[float], step_times: Sequence[float]) -> ThroughputFit:
    """Least-squares fit of t = alpha + beta B in relative error (weights 1/t), since t spans decades.

    Both coefficients are kept >= 0. A term that is rounding noise is zero: the solver leaves
    a flat t(B) with a beta of about +-1e-22, its sign up to the BLAS build, which would make B* either unbounded
    or some 1e10; a term worth less than a billionth of the other one across the grid counts as none.
    """
    rows = torch.tensor([[1.0 / t, b / t] for b, t in zip(batch_sizes, step_times)], dtype=torch.float64)
    rhs = torch.ones(len(rows), dtype=torch.float64)
    if len(set(batch_sizes)) < 2:
        return ThroughputFit(float(sum(step_times) / len(step_times)), 0.0)
    alpha, beta = torch.linalg.lstsq(rows, rhs.unsqueeze(1)).solution.squeeze(1).tolist()
    if beta * max(batch_sizes) <= _NEGLIGIBLE * abs(alpha):
        return ThroughputFit(_one_term(rows[:, 0], rhs), 0.0)
    if alpha <= _NEGLIGIBLE * abs(beta) * min(batch_sizes):
        return ThroughputFit(0.0, _one_term(rows[:, 1], rhs))
    return ThroughputFit(alpha, beta)


def optimal_batch_size(b_noise: float, throughput: ThroughputFit) -> float:
    """B* = sqrt(B_noise alpha / beta), the batch size with the least S(B) t(B); ``inf`` without a per-sample cost."""
    if math.isnan(b_noise) or b_noise <= 0:
        return float("nan")
    if throughput.beta <= 0 or math.isinf(b_noise):
        return math.inf
    return math.sqrt(b_noise * throughput.alpha / throughput.beta)


def lr_factor(rule: str, ratio: float) -> float:
    """How much the LR moves when the batch grows by ``ratio``, by the rule the study and the warmup share:
    ``linear`` (x ratio, SGD's), ``sqrt`` (x sqrt(ratio), Adam's) or ``none``."""
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def nearest_in_grid(value: float, grid: Sequence[int]) -> int:
    """The grid's batch size closest to ``value`` in log scale (its ends for values beyond them)."""
    if math.isnan(value):
        raise ValueError("no batch size near nan")
    if math.isinf(value):
        return max(grid)
    return min(grid, key=lambda b: abs(math.log(b) - math.log(max(value, 1e-12))))
