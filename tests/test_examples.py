"""The example workloads (``batchlab.examples``): each model learns on its data within a few steps, and a quick
study of each runs from its shipped config on tiny settings, offline on the CPU."""

import importlib.util
import json
import math

import pytest
import torch
from conftest import CONFIGS, plain_trainer

from batchlab.examples import chars, digits

EXAMPLES = {
    "digits": (digits.DigitsCNN, digits.DigitsData, {}),
    "chars": (chars.CharTransformer, chars.CharsData, {"n_sequences": 600}),
}
# Tiny settings: two batch sizes, one short timing round, a short reference run and one noise batch per point.
QUICK_TINY = ["--quick", "--grid", "[8, 64]", "--throughput_steps", "3", "--throughput_rounds", "1",
              "--warmup_steps", "1", "--gns_steps", "20", "--gns_points", "2", "--gns_batch_size", "128",
              "--gns_batches", "1", "--trainer.accelerator", "cpu", "--out", "quick"]


def _val_loss(model, data) -> float:
    with torch.no_grad():
        return sum(model._loss(b) for b in data.val_dataloader()).item()


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_learns_in_a_few_steps(name, tmp_path):
    model_cls, data_cls, data_args = EXAMPLES[name]
    torch.manual_seed(0)
    model, data = model_cls(), data_cls(batch_size=32, **data_args)
    data.setup("fit")
    before = _val_loss(model, data)
    plain_trainer(tmp_path, max_steps=40, max_epochs=-1, limit_val_batches=0).fit(model, datamodule=data)
    after = _val_loss(model, data)
    assert after < 0.8 * before, f"{name}: validation loss {before:.3f} -> {after:.3f} in 40 steps"


def test_the_batch_size_is_read_when_the_training_loader_is_built():
    data = chars.CharsData(batch_size=8, n_sequences=200)
    data.setup("fit")
    assert next(iter(data.train_dataloader()))[0].shape == (8, 32)
    data.hparams.batch_size = 64  # as the study and the batch-size finder set it
    loader = data.train_dataloader()
    assert all(len(x) == 64 for x, _ in loader), "full batches only: the last, smaller one is dropped"
    data.hparams.batch_size = 1000  # beyond the data: one batch of all of it, not an empty epoch
    assert [len(x) for x, _ in data.train_dataloader()] == [180]


def test_the_grammar_text_is_the_same_on_every_run_and_in_the_alphabet():
    text = chars.grammar_text(5000, seed=3)
    assert text == chars.grammar_text(5000, seed=3) != chars.grammar_text(5000, seed=4)
    assert set(text) <= set(chars.ALPHABET) and len(text) >= 5000


@pytest.mark.parametrize("name", EXAMPLES)
def test_a_quick_study_of_each_example_runs_from_its_config(name, batchlab, tmp_path):
    """In seconds and without a warning; the Transformer's attention has no vmap batching rule, so its noise scale
    comes from gradient norms at two batch sizes, and says why. Both train with Adam-family optimizers, whose
    noise scale is that of the preconditioned gradients."""
    extra = ["--data.n_sequences", "600"] if name == "chars" else []
    result = batchlab("study", "-c", str(CONFIGS / f"{name}.yaml"), *QUICK_TINY, *extra)
    assert result.code == 0, result.err
    root = tmp_path / "quick"
    quick, gns = (json.loads((root / f).read_text()) for f in ("quick.json", "gns.json"))
    assert quick["recommended_batch_size"] in quick["grid"] and math.isfinite(quick["b_simple"])
    assert "batchlab study (quick)" in result.out
    assert "Warning" not in result.err + result.out and "performance drop" not in result.err
    method = {"digits": "per_example", "chars": "two_batch"}[name]
    assert gns["method"] == quick["b_simple_method"] == method
    if name == "chars":
        assert "no batching rule for aten::_scaled_dot_product" in gns["method_reason"]
        assert quick["b_simple_method_reason"] == gns["method_reason"]
        assert "Per-example gradients were not used: torch.func has no batching rule" in result.out
    else:
        assert "method_reason" not in gns and "Per-example gradients were not used" not in result.out
    assert gns["preconditioner"] == quick["b_simple_preconditioner"] == "adam"
    # Adam has no second moment before its first step: the initial weights' point is raw, every later one not.
    assert [p.get("preconditioned", False) for p in gns["points"]] == [False] + [True] * (len(gns["points"]) - 1)
    assert f"{method} gradients, preconditioned by Adam's second moment" in result.out


def test_the_digits_example_without_scikit_learn_is_one_line(batchlab, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else find_spec(name, *a))
    result = batchlab("study", "-c", str(CONFIGS / "digits.yaml"), *QUICK_TINY)
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.strip().splitlines()[-1].startswith("batchlab: error: the digits example needs scikit-learn")
