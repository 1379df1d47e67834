"""The study's science against closed forms: gradient noise scale estimators on a linear model with label noise,
and the fits of S(B) and t(B) on points made from known parameters."""

import math

import pytest
import torch
from torch import nn

from batchlab.scaling import (
    NoiseSample, ScalingFit, ThroughputFit, adam_preconditioner, b_simple, ema, estimate_from_norms, fit_steps_log,
    fit_throughput, data_parallel_noise, local_gradient, nearest_in_grid, optimal_batch_size, per_example_gradients,
    per_example_noise, two_batch_noise,
)


def _linear_problem(d: int, sigma: float, distance: float, seed: int = 0):
    """A bias-free linear model at distance ``distance`` from w*, data x ~ N(0, I), y = w*.x + N(0, sigma^2).

    For the MSE, B_simple = tr(Sigma) / |G|^2 = (d + 1) + d sigma^2 / |w - w*|^2 (the noise scale of the
    issue's closed form, derived with E[(delta.x)^2 |x|^2] = (d + 2)|delta|^2 for Gaussian x).
    """
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, 1, generator=g, dtype=torch.float64)
    delta = torch.randn(d, 1, generator=g, dtype=torch.float64)
    delta = delta / delta.norm() * distance
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + delta).T)

    def batches(n_batches: int, size: int):
        for _ in range(n_batches):
            x = torch.randn(size, d, generator=g, dtype=torch.float64)
            yield x, x @ w_star + sigma * torch.randn(size, 1, generator=g, dtype=torch.float64)

    def loss_fn(batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    closed_form = (d + 1) + d * sigma**2 / distance**2
    return model, loss_fn, batches, closed_form


@pytest.mark.parametrize(("d", "sigma", "distance"), [(2, 0.0, 1.0), (4, 1.0, 1.0), (8, 2.0, 0.5), (3, 1.0, 3.0)])
def test_per_example_estimator_matches_the_closed_form(d, sigma, distance):
    model, loss_fn, batches, closed_form = _linear_problem(d, sigma, distance)
    samples = [per_example_noise(model, loss_fn, b) for b in batches(300, 256)]
    assert b_simple(samples) == pytest.approx(closed_form, rel=0.06)
    g2 = sum(s.g2 for s in samples) / len(samples)
    assert g2 == pytest.approx(4 * distance**2, rel=0.06), "|G|^2 = |2 delta|^2 for the MSE"


@pytest.mark.parametrize(("d", "sigma", "distance", "b_small"), [(4, 1.0, 1.0, 8), (8, 2.0, 0.5, 16)])
def test_two_batch_estimator_matches_the_closed_form(d, sigma, distance, b_small):
    model, loss_fn, batches, closed_form = _linear_problem(d, sigma, distance, seed=1)
    samples = [two_batch_noise(model, loss_fn, b, b_small) for b in batches(300, 256)]
    assert b_simple(samples) == pytest.approx(closed_form, rel=0.08)


def test_both_estimators_agree_on_the_same_batches():
    model, loss_fn, batches, _ = _linear_problem(4, 1.0, 1.0, seed=2)
    data = list(batches(200, 128))
    per_example = b_simple([per_example_noise(model, loss_fn, b) for b in data])
    two_batch = b_simple([two_batch_noise(model, loss_fn, b, 16) for b in data])
    assert per_example == pytest.approx(two_batch, rel=0.1)


def _simulate_ranks(world_size, local_inputs):
    """Run ``data_parallel_noise`` as each of ``world_size`` ranks would, with an all-reduce that averages what
    the ranks really sent: a first pass records each rank's tensor, a second gives every rank their mean."""
    sent = []
    for rank in range(world_size):
        grad, small_sq, b_small, b_big = local_inputs(rank)
        data_parallel_noise(grad, small_sq, b_small, b_big, lambda t: sent.append(t.clone()) or t)
    mean = torch.stack(sent).mean(0)
    results = []
    for rank in range(world_size):
        grad, small_sq, b_small, b_big = local_inputs(rank)
        results.append(data_parallel_noise(grad, small_sq, b_small, b_big, lambda t: mean))
    return results


@pytest.mark.parametrize("world_size", [2, 4])
def test_data_parallel_estimates_equal_one_device_on_the_global_batch(world_size):
    """The ranks' gradient norms are the two-batch estimator with B_small = one rank's batch; per-example gradients
    on each rank, averaged over ranks, are the per-example estimator of the global batch."""
    model, loss_fn, batches, _ = _linear_problem(4, 1.0, 1.0, seed=3)
    (batch,) = batches(1, 64)
    b_local = 64 // world_size

    def shard(rank):
        return tuple(t[rank * b_local:(rank + 1) * b_local] for t in batch)

    def rank_norms(rank):
        grad = local_gradient(model, loss_fn, shard(rank))
        return grad, grad.pow(2).sum().item(), b_local, 64

    def per_example(rank):
        grad, example_sq = per_example_gradients(model, loss_fn, shard(rank))
        return grad, example_sq, 1, 64

    for got, expected in ((_simulate_ranks(world_size, rank_norms), two_batch_noise(model, loss_fn, batch, b_local)),
                          (_simulate_ranks(world_size, per_example), per_example_noise(model, loss_fn, batch))):
        assert all(r == got[0] for r in got), "every rank gets the same estimate"
        assert got[0].g2 == pytest.approx(expected.g2, rel=1e-9)
        assert got[0].trace == pytest.approx(expected.trace, rel=1e-9)


@pytest.mark.parametrize(("g2", "trace", "b_small", "b_big"), [(2.0, 30.0, 1, 64), (0.5, 4.0, 8, 512)])
def test_norm_estimator_inverts_the_expected_norms_exactly(g2, trace, b_small, b_big):
    sample = estimate_from_norms(g2 + trace / b_small, g2 + trace / b_big, b_small, b_big)
    assert sample.g2 == pytest.approx(g2) and sample.trace == pytest.approx(trace)
    with pytest.raises(ValueError):
        estimate_from_norms(1.0, 1.0, 8, 8)


def test_b_simple_averages_numerator_and_denominator_separately():
    samples = [NoiseSample(g2=1.0, trace=10.0), NoiseSample(g2=3.0, trace=10.0)]
    assert b_simple(samples) == pytest.approx(10.0 / 2.0)  # not the mean of 10 and 3.33
    assert b_simple([NoiseSample(g2=-0.1, trace=5.0)]) == math.inf


def test_ema_is_bias_corrected():
    assert ema([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])
    values = ema([0.0, 10.0], 0.5)
    assert values[0] == 0.0 and values[1] == pytest.approx(10.0 * 0.5 / 0.75)


@pytest.mark.parametrize(("s_min", "b_crit"), [(100.0, 5.0), (40.0, 300.0), (1000.0, 0.5)])
def test_the_log_space_fit_recovers_known_parameters(s_min, b_crit):
    grid = [2**k for k in range(13)]
    truth = ScalingFit(s_min, s_min * b_crit, b_crit)
    fit = fit_steps_log(grid, [truth.steps(b) for b in grid])
    assert fit.s_min == pytest.approx(s_min, rel=1e-5) and fit.b_crit == pytest.approx(b_crit, rel=1e-4)
    assert fit.e_min == pytest.approx(s_min * b_crit, rel=1e-4) and fit.rms == pytest.approx(0.0, abs=1e-6)
    noise = torch.Generator().manual_seed(0)
    noisy = [truth.steps(b) * math.exp(0.05 * torch.randn(1, generator=noise).item()) for b in grid]
    fit = fit_steps_log(grid, noisy, [0.05] * len(grid))
    assert fit.s_min == pytest.approx(s_min, rel=0.1) and fit.b_crit == pytest.approx(b_crit, rel=0.3)
    # Residuals in units of their standard error: chi^2 per degree of freedom about 1 where the model holds.
    assert 0.3 < fit.chi2_per_dof < 2.5
    assert fit.residuals == pytest.approx([math.log(s / fit.steps(b)) for b, s in zip(grid, noisy)])


def test_the_log_space_fit_weighs_every_point_by_its_error_not_its_size():
    """The plateau's many points must not pull the fit off the few of the 1/B regime: in log space a 20% miss at
    B=1 counts as much as one at B=4096 (a fit of S itself weighs the small-B points' large steps alone)."""
    grid = [2**k for k in range(13)]
    truth = ScalingFit(100.0, 700.0, 7.0)
    steps = [truth.steps(b) * (1.2 if b >= 64 else 1.0) for b in grid]  # the plateau 20% high
    fit = fit_steps_log(grid, steps)
    assert max(abs(r) for r in fit.residuals) < math.log(1.2)
    # A point whose error is tiny is all but matched, whatever the others say.
    errors = [0.001 if b == 1 else 0.2 for b in grid]
    fit = fit_steps_log(grid, [s * (1.5 if b == 1 else 1.0) for b, s in zip(grid, steps)], errors)
    assert fit.steps(1) == pytest.approx(1.5 * steps[0], rel=0.01)


def test_the_log_space_fit_takes_the_limits_and_needs_two_batch_sizes():
    fit = fit_steps_log([1, 2, 4, 8], [100.0, 101.0, 99.0, 100.0])  # no benefit from larger batches
    assert fit.b_crit == pytest.approx(0.0, abs=0.05) and fit.s_min == pytest.approx(100.0, rel=0.02)
    fit = fit_steps_log([1, 2, 4, 8], [800.0, 400.0, 200.0, 100.0])  # perfect scaling all the way
    assert fit.b_crit >= 100 * 8 and fit.e_min == pytest.approx(800.0, rel=0.01)
    assert fit_steps_log([4, 4], [10.0, 12.0]) is None
    assert fit_steps_log([1, 2, 4], [100.0, 60.0, 50.0], [0.1, 0.1, 0.1]).chi2_per_dof is not None
    assert fit_steps_log([1, 2], [100.0, 60.0], [0.1, 0.1]).chi2_per_dof is None, "no degree of freedom left"


def test_fit_throughput_recovers_alpha_and_beta():
    grid = [2**k for k in range(17)]
    fit = fit_throughput(grid, [2e-3 + 1e-7 * b for b in grid])
    assert fit.alpha == pytest.approx(2e-3, rel=1e-6) and fit.beta == pytest.approx(1e-7, rel=1e-6)
    # A flat t(B) is no per-sample cost at all: beta exactly 0 (so B* unbounded), not the solver's +-1e-22, whose
    # sign depends on the BLAS build. Likewise a t(B) proportional to B has no fixed cost.
    for flat_grid in (grid, [2, 8, 32, 64, 256], [2, 4, 32, 64]):
        for t in (1e-3, 3.7e-4, 2.5):
            flat = fit_throughput(flat_grid, [t] * len(flat_grid))
            assert flat.beta == 0.0 and flat.alpha == pytest.approx(t)
            assert optimal_batch_size(50.0, flat) == math.inf
    proportional = fit_throughput(grid, [1e-7 * b for b in grid])
    assert proportional.alpha == 0.0 and proportional.beta == pytest.approx(1e-7)
    small = fit_throughput(grid, [1e-3 + 1e-10 * b for b in grid])  # small but real: 0.7% at the largest B
    assert small.beta == pytest.approx(1e-10, rel=1e-6)


def test_optimal_batch_size_and_nearest_grid_point():
    assert optimal_batch_size(5.0, ThroughputFit(2e-3, 1e-7)) == pytest.approx(math.sqrt(5 * 2e-3 / 1e-7))
    assert optimal_batch_size(5.0, ThroughputFit(2e-3, 0.0)) == math.inf
    assert optimal_batch_size(math.inf, ThroughputFit(2e-3, 1e-7)) == math.inf, "noise swamps the gradient"
    assert math.isnan(optimal_batch_size(float("nan"), ThroughputFit(2e-3, 1e-7)))
    assert nearest_in_grid(300.0, [1, 2, 4, 256, 512]) == 256
    assert nearest_in_grid(400.0, [1, 2, 4, 256, 512]) == 512
    assert nearest_in_grid(math.inf, [1, 2, 4]) == 4 and nearest_in_grid(0.1, [1, 2, 4]) == 1


class _Attention(nn.Module):
    """Causal self-attention through scaled_dot_product_attention, which torch.func has no CPU batching rule for."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # (batch, heads, time, width), as attention has it
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_per_example_gradients_refuse_vmaps_slow_fallback_instead_of_warning(recwarn):
    """Pins torch's private switch (``torch._C._functorch._set_vmap_fallback_enabled``): where per-example gradients
    would need vmap's fallback they raise at once, silently, and the switch is put back afterwards."""
    model = _Attention()
    x = torch.randn(4, 5, 8)
    was = torch._C._functorch._is_vmap_fallback_enabled()
    with pytest.raises(RuntimeError, match="hit the vmap fallback"):
        per_example_gradients(model, lambda b: model(b[0]).pow(2).mean(), (x,))
    assert torch._C._functorch._is_vmap_fallback_enabled() == was
    assert not [w for w in recwarn if "performance drop" in str(w.message)]
    two_batch_noise(model, lambda b: model(b[0]).pow(2).mean(), (x,), 2)  # plain autograd is fine


def _crafted_gradients(b: int = 12, d: int = 5):
    """A bias-free linear model under the loss mean_i(w . x_i): example i's gradient is x_i itself, whatever w."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(b, d, generator=g, dtype=torch.float64) + 0.5
    model = nn.Linear(d, 1, bias=False).double()
    v_hat = torch.rand(1, d, generator=g, dtype=torch.float64) * 4 + 0.1  # a known second moment
    eps = 1e-8
    return model, (lambda batch: model(batch[0]).mean()), x, {"weight": v_hat.sqrt() + eps}


def test_the_preconditioned_estimates_are_the_hand_computed_ones():
    """Divided by P = sqrt(v_hat) + eps, the per-example gradients are h_i = x_i / P: tr(Sigma) is their sample
    variance, |G|^2 their mean's squared norm less tr(Sigma) / B; the two-batch estimate is the same algebra on
    the chunks' means."""
    model, loss_fn, x, precond = _crafted_gradients()
    h = x / precond["weight"]
    b = len(h)
    trace = (h - h.mean(0)).pow(2).sum().item() / (b - 1)
    g2 = h.mean(0).pow(2).sum().item() - trace / b
    sample = per_example_noise(model, loss_fn, (x,), precond)
    assert sample.trace == pytest.approx(trace, rel=1e-9) and sample.g2 == pytest.approx(g2, rel=1e-9)
    assert b_simple([sample]) == pytest.approx(trace / g2, rel=1e-9)
    raw = per_example_noise(model, loss_fn, (x,))
    assert raw.trace == pytest.approx((x - x.mean(0)).pow(2).sum().item() / (b - 1), rel=1e-9)
    assert b_simple([raw]) != pytest.approx(b_simple([sample]), rel=1e-3), "the preconditioner changes the answer"

    chunk_means = h.view(3, 4, -1).mean(1)  # b_small = 4
    small, big = chunk_means.pow(2).sum(1).mean().item(), h.mean(0).pow(2).sum().item()
    two = two_batch_noise(model, loss_fn, (x,), 4, precond)
    assert two.trace == pytest.approx((small - big) / (1 / 4 - 1 / b), rel=1e-9)
    assert two.g2 == pytest.approx((b * big - 4 * small) / (b - 4), rel=1e-9)
    flat = local_gradient(model, loss_fn, (x,), precond)
    assert torch.allclose(flat, h.mean(0))


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=1e-3, betas=(0.9, 0.99)),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
    lambda ps: torch.optim.NAdam(ps, lr=1e-3),
], ids=["adam", "adamw", "amsgrad", "nadam"])
def test_adams_preconditioner_is_its_own_bias_corrected_second_moment(make):
    """After steps that each saw the same gradient c, v_hat = c^2 exactly (the bias correction undoes the EMA's
    start from 0), so P = |c| + eps, per element."""
    model = nn.Linear(3, 2).double()
    opt = make(model.parameters())
    assert adam_preconditioner(opt, model.named_parameters()) is None, "no state before the first step"
    c = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for _ in range(3):
        for n, p in model.named_parameters():
            p.grad = c[n].clone()
        opt.step()
    got = adam_preconditioner(opt, model.named_parameters())
    eps = opt.param_groups[0]["eps"]
    assert set(got) == {"weight", "bias"}
    for n in got:
        assert torch.allclose(got[n], c[n].abs() + eps, rtol=1e-9, atol=0)


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: torch.optim.RMSprop(ps, lr=0.1)], ids=["sgd", "rmsprop"])
def test_other_optimizers_take_the_raw_gradients(make):
    model = nn.Linear(3, 2)
    opt = make(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert adam_preconditioner(opt, model.named_parameters()) is None
