"""The speed settings change how a step runs, never what it computes: the lean step, ``configs/fast.yaml``, the
compiled network, the data path's shortcuts and the module's attribute fast path, each against the plain path."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import QUIET, SEED, load_summary, run_dirs, scalars
from lightning.pytorch import Trainer
from torch import nn

from batchlab import notebook
from batchlab.data import TensorBatches, ToyRegressionData, make_synthetic
from batchlab.model import MLPRegressor

FAST = str(Path(SEED).with_name("fast.yaml"))


def _fit(batchlab, tmp_path, *args):
    result = batchlab("fit", "-c", SEED, *QUIET, *args)
    assert result.code == 0, result.err
    log_dir = run_dirs(tmp_path)[-1]
    return log_dir, scalars(log_dir), load_summary(log_dir)


@pytest.mark.parametrize(
    "data",
    [[], ["--data.n_samples", "300", "--data.noise", "1", "--data.batch_size", "32", "--trainer.max_epochs", "4",
          "--trainer.log_every_n_steps", "3"]],
    ids=["seed", "synthetic-every-3-steps"],
)
def test_fast_overlay_logs_the_same_tags_steps_and_values_and_ends_with_the_same_weights(batchlab, tmp_path, data):
    plain_dir, plain, plain_summary = _fit(batchlab, tmp_path, *data)
    fast_dir, fast, fast_summary = _fit(batchlab, tmp_path, "-c", FAST, *data)
    for tag in ("train/loss", "train/loss_vs_samples", "epoch"):
        assert [s for s, _ in fast[tag]] == [s for s, _ in plain[tag]], tag
        assert max(abs(a - b) for (_, a), (_, b) in zip(fast[tag], plain[tag])) == 0, tag
    assert {t for t in plain if not t.startswith("hp/")} == {t for t in fast if not t.startswith("hp/")}
    assert fast_summary["predictions"] == plain_summary["predictions"]
    assert fast_summary["train_loss"] == plain_summary["train_loss"]
    assert [p.name for p in (fast_dir / "checkpoints").glob("*.ckpt")] == ["last.ckpt"]
    plain_ckpt = next((plain_dir / "checkpoints").glob("*.ckpt"))
    a = torch.load(plain_ckpt, weights_only=True)["state_dict"]
    b = torch.load(fast_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_overlay_keeps_parity_with_the_notebooks_loop(batchlab, tmp_path, seed):
    _, losses, _ = notebook.train(seed=seed)
    _, tags, _ = _fit(batchlab, tmp_path, "-c", FAST, "--seed_everything", str(seed))
    ours = [v for _, v in tags["train/loss"]]
    assert len(ours) == len(losses) == 100
    assert max(abs(a - b) for a, b in zip(ours, losses)) < 1e-5


def test_lean_step_refuses_gradient_accumulation_in_one_line(batchlab):
    result = batchlab("fit", "-c", SEED, *QUIET, "-c", FAST, "--trainer.accumulate_grad_batches", "2")
    assert result.code == 2
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("batchlab: error: ") and "accumulate_grad_batches" in last


def test_a_fit_that_stops_early_still_writes_every_buffered_loss(tmp_path):
    dm = ToyRegressionData(n_samples=64, batch_size=4)
    from batchlab.loggers import TensorBoardLogger
    from batchlab.summary import RunSummary

    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = Trainer(
        max_steps=7, logger=logger, log_every_n_steps=1, callbacks=[RunSummary(verbose=False, log_buffer=64)],
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(MLPRegressor(lean_step=True), dm)
    tags = scalars(logger.log_dir)
    assert [s for s, _ in tags["train/loss"]] == list(range(7))
    assert [s for s, _ in tags["train/loss_vs_samples"]] == [4 * k for k in range(1, 8)]


def test_on_the_cpu_each_loss_point_reaches_the_loggers_in_its_own_step(tmp_path):
    """No loss tensors are held back on the CPU, whatever ``log_buffer`` says (see ``RunSummary``)."""
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import Logger

    from batchlab.summary import RunSummary

    class Recorder(Logger):
        name, version = "recorder", 0

        def __init__(self):
            super().__init__()
            self.steps = []

        def log_metrics(self, metrics, step=None):
            if "train/loss_vs_samples" in metrics:
                self.steps.append(step)

        def log_hyperparams(self, *args, **kwargs):
            pass

    class Check(Callback):
        written = []

        def on_train_batch_end(self, trainer, *args):
            self.written.append(len(trainer.logger.steps))

    logger = Recorder()
    trainer = Trainer(
        max_steps=5, logger=logger, log_every_n_steps=1, callbacks=[RunSummary(verbose=False, log_buffer=64), Check()],
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(MLPRegressor(lean_step=True), ToyRegressionData(n_samples=40, batch_size=4))
    assert Check.written == [1, 2, 3, 4, 5]
    assert logger.steps == [4, 8, 12, 16, 20]


def _lean_fit(tmp_path, callbacks, steps=6):
    from batchlab.summary import RunSummary

    torch.manual_seed(0)
    summary = RunSummary(verbose=False)
    trainer = Trainer(
        max_steps=steps, logger=False, callbacks=[summary, *callbacks], enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
    )  # fmt: skip
    model = MLPRegressor(lean_step=True)
    trainer.fit(model, ToyRegressionData(n_samples=24, batch_size=4))
    return trainer, model


def test_lean_step_without_listeners_skips_lightnings_backward_and_step_wrappers_and_counts_steps(tmp_path, monkeypatch):
    from lightning.pytorch.strategies import SingleDeviceStrategy

    calls = []
    for name in ("backward", "optimizer_step"):
        original = getattr(SingleDeviceStrategy, name)
        monkeypatch.setattr(
            SingleDeviceStrategy, name, lambda self, *a, _o=original, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1]
        )
    trainer, model = _lean_fit(tmp_path, [])
    assert calls == []
    assert trainer.global_step == 6 and model._hookless is False, "the shortcut holds for one fit only"


def test_lean_step_still_calls_overridden_backward_and_step_hooks_and_trains_the_same(tmp_path):
    from lightning.pytorch import Callback

    class Hooks(Callback):
        def __init__(self):
            self.seen = []

        def on_before_backward(self, trainer, module, loss):
            self.seen.append("before_backward")

        def on_after_backward(self, trainer, module):
            grads = [p.grad for p in module.parameters()]
            self.seen.append("after_backward" if all(g is not None for g in grads) else "no grads")

        def on_before_optimizer_step(self, trainer, module, optimizer):
            self.seen.append("before_step")

    hooks = Hooks()
    trainer, hooked = _lean_fit(tmp_path / "hooked", [hooks])
    _, plain = _lean_fit(tmp_path / "plain", [])
    assert hooks.seen == ["before_backward", "after_backward", "before_step"] * 6
    assert trainer.global_step == 6
    assert all(torch.equal(a, b) for a, b in zip(hooked.state_dict().values(), plain.state_dict().values()))


def test_training_step_signature_is_the_real_one_and_a_subclass_keeps_its_own():
    import inspect

    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

    class OneArgument(MLPRegressor):
        def training_step(self, batch):
            return super().training_step(batch, 0)

    assert inspect.getfullargspec(MLPRegressor().training_step).args == ["self", "batch", "batch_idx"]
    assert is_param_in_hook_signature(MLPRegressor().training_step, "batch_idx", min_args=2)
    assert not is_param_in_hook_signature(OneArgument().training_step, "batch_idx", min_args=2)


def test_no_profiler_profiles_nothing_and_a_fit_with_it_trains_the_same(tmp_path):
    from batchlab.profiler import NoProfiler

    profiler = NoProfiler()
    with profiler.profile("anything") as entered:
        assert entered is None
    with pytest.raises(KeyError):
        with profiler.profile("anything"):
            raise KeyError("errors pass through")
    assert profiler.summary() == ""
    models = []
    for profiler in (None, NoProfiler()):
        torch.manual_seed(0)
        trainer = Trainer(
            max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, accelerator="cpu", profiler=profiler, default_root_dir=tmp_path,
        )  # fmt: skip
        models.append(MLPRegressor(lean_step=True))
        trainer.fit(models[-1], ToyRegressionData(n_samples=16, batch_size=4))
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))


def test_compiled_network_trains_like_the_eager_one():
    """``compile`` on the CPU (inductor); on a GPU the same flag with ``reduce-overhead`` adds CUDA graphs."""
    x, y = make_synthetic(64)
    results = []
    for compile_mode in (None, "default"):
        torch.manual_seed(0)
        model = MLPRegressor(compile=compile_mode)
        opt = model.configure_optimizers()
        losses = []
        for step in range(5):
            xb, yb = x[step * 8 : step * 8 + 8], y[step * 8 : step * 8 + 8]
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results.append((losses, {k: v.clone() for k, v in model.state_dict().items()}))
    (eager, eager_state), (compiled, compiled_state) = results
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert eager_state.keys() == compiled_state.keys(), "checkpoints keep the eager parameter names"
    for k in eager_state:
        torch.testing.assert_close(compiled_state[k], eager_state[k], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_lean_step_with_cuda_graphs_matches_eager_on_the_gpu(batchlab, tmp_path):
    data = ["--data.n_samples", "4096", "--data.batch_size", "1024", "--trainer.max_epochs", "3",
            "--trainer.accelerator", "gpu"]  # fmt: skip
    _, eager, _ = _fit(batchlab, tmp_path, "-c", FAST, *data)
    _, compiled, _ = _fit(batchlab, tmp_path, "-c", FAST, "--model.compile", "reduce-overhead", *data)
    a = [v for _, v in eager["train/loss"]]
    b = [v for _, v in compiled["train/loss"]]
    assert len(a) == len(b) == 12
    assert all(math.isclose(p, q, rel_tol=1e-4, abs_tol=1e-5) for p, q in zip(a, b))


def test_three_tensor_batches_match_the_two_tensor_fast_path():
    x, y = make_synthetic(37)
    w = torch.arange(37.0).unsqueeze(1)
    torch.manual_seed(5)
    two = [b for _ in range(2) for b in TensorBatches((x, y), 8, shuffle=True)]
    torch.manual_seed(5)
    three = [b for _ in range(2) for b in TensorBatches((x, y, w), 8, shuffle=True)]
    assert len(two) == len(three) == 10
    for (x2, y2), (x3, y3, w3) in zip(two, three):
        assert torch.equal(x2, x3) and torch.equal(y2, y3)
        assert torch.equal(x[w3.squeeze(1).long()], x3), "the third tensor is gathered with the same rows"


def test_large_data_gathered_from_one_packed_copy_gives_the_same_batches(monkeypatch):
    from batchlab import data

    x, y = make_synthetic(101)
    w = torch.arange(101.0).unsqueeze(1)
    for tensors in ((x, y), (x, y, w), (x, y.squeeze(1))):
        runs = []
        for threshold in (1 << 60, 0):  # never packed, always packed where it applies
            monkeypatch.setattr(data, "PACK_MIN_BYTES", threshold)
            torch.manual_seed(7)
            batches = TensorBatches(tensors, 16, shuffle=True)
            runs.append(([b for _ in range(2) for b in batches], torch.get_rng_state(), batches._rows is not None))
        (plain, plain_rng, _), (packed, packed_rng, was_packed) = runs
        assert was_packed == (tensors[-1].dim() == 2), "only 2-D tensors of one dtype are packed"
        assert torch.equal(plain_rng, packed_rng) and len(plain) == len(packed) == 14
        for a, b in zip(plain, packed):
            assert all(torch.equal(s, t) and s.shape == t.shape and t.is_contiguous() for s, t in zip(a, b))


def test_synthetic_data_is_the_documented_formula():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(500, 3, generator=g) * (5.0 - -2.0) + -2.0
    y = x.sum(dim=1, keepdim=True) + 0.5 * torch.randn(500, 1, generator=g)
    x2, y2 = make_synthetic(500, 3, 0.5, (-2.0, 5.0), seed=4)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_without_held_out_splits_training_uses_the_data_without_a_copy():
    dm = ToyRegressionData(n_samples=100)
    dm.setup("fit")
    x, y = dm.splits["train"]
    full_x, full_y = dm.full_data()
    assert torch.equal(x, full_x) and torch.equal(y, full_y)
    assert x.is_contiguous() and x._base is None, "the generated tensor itself, not an index copy"


def test_batches_already_on_the_device_are_passed_through_and_others_are_moved():
    dm = ToyRegressionData()
    batch = (torch.ones(2, 2), torch.ones(2, 1))
    assert dm.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch
    moved = dm.transfer_batch_to_device([torch.ones(2, 2, dtype=torch.float64)], torch.device("cpu"), 0)
    assert moved[0].dtype == torch.float64
    moved = dm.transfer_batch_to_device({"x": torch.ones(1)}, torch.device("cpu"), 0)
    assert torch.equal(moved["x"], torch.ones(1))


def test_module_attribute_fast_path_keeps_nn_module_semantics():
    model = MLPRegressor()
    model._current_fx_name = "training_step"  # what Lightning sets around every hook
    assert model._current_fx_name == "training_step" and "_current_fx_name" in model.__dict__
    model.extra = nn.Linear(1, 1)
    assert "extra" in model._modules and any(n.startswith("extra.") for n, _ in model.named_parameters())
    model.scale = nn.Parameter(torch.ones(1))
    assert "scale" in model._parameters
    model.register_buffer("running", torch.zeros(1))
    model.running = torch.ones(1)
    assert torch.equal(model._buffers["running"], torch.ones(1))
    with pytest.raises(TypeError):
        model.scale = 3.0  # a parameter cannot become a float, fast path or not
    model.lr = 0.5  # a property setter still runs
    assert model.hparams.lr == 0.5
    model.automatic_optimization = False
    assert model.automatic_optimization is False


def test_last_checkpoint_saves_once_at_the_end_and_is_the_trainers_checkpoint_callback(tmp_path, monkeypatch):
    from batchlab.checkpoint import LastCheckpoint

    callback = LastCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = Trainer(
        max_epochs=3, logger=False, callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu",
    )  # fmt: skip
    saves = []
    original = trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda path, *a, **k: (saves.append(path), original(path, *a, **k)))
    trainer.fit(MLPRegressor(), ToyRegressionData(n_samples=16, batch_size=4))
    assert trainer.checkpoint_callback is callback
    assert [Path(p).name for p in saves] == ["last.ckpt"]
    assert Path(callback.last_model_path) == tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(callback.last_model_path, weights_only=False)
    assert state["global_step"] == 12


def test_device_shuffle_changes_nothing_on_the_cpu():
    x, y = make_synthetic(50)
    torch.manual_seed(3)
    plain = [b for _ in range(3) for b in TensorBatches((x, y), 8, shuffle=True)]
    state = torch.get_rng_state()
    torch.manual_seed(3)
    on_device = [b for _ in range(3) for b in TensorBatches((x, y), 8, shuffle=True, shuffle_on_device=True)]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, on_device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_shuffle_draws_a_permutation_on_the_gpu_and_keeps_the_cpu_rng_stream():
    x = torch.arange(1000.0, device="cuda").unsqueeze(1)
    torch.manual_seed(3)
    for _ in TensorBatches((x,), 64, shuffle=True):
        pass
    state = torch.get_rng_state()
    torch.manual_seed(3)
    rows = torch.cat([b[0] for b in TensorBatches((x,), 64, shuffle=True, shuffle_on_device=True)])
    assert torch.equal(torch.get_rng_state(), state), "the CPU stream advances as with a DataLoader"
    assert rows.device.type == "cuda" and torch.equal(rows.sort(0).values, x)


def test_a_fit_without_a_logger_writes_its_summary_into_a_root_dir_nothing_made_yet(tmp_path):
    root = tmp_path / "new" / "root"
    _lean_fit(root, [])
    assert json.loads((root / "summary.json").read_text())["steps"] == 6
