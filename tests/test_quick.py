"""The quick study in seconds: throughput runs that time fewer steps where a step is long, and the raw gradients
for SGD. The examples' quick studies (tests/test_examples.py) check the noise estimator picked where per-example
gradients would fall back to vmap's slow path, and the gradients Adam steps by."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import STUDY

from batchlab.study import throughput as timing
from batchlab.study.settings import StudySettings
from test_examples import QUICK_TINY


class _Clock:
    """perf_counter for the StepTimer: every step takes ``step_s``."""

    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 0.0, step_s

    def perf_counter(self) -> float:
        self.now += self.step_s
        return self.now


def _timed(monkeypatch, step_s: float, warmup: int, seconds: float, max_steps: int):
    """The steps a StepTimer times, and the step it stops the fit at (None: it ran its ``max_steps``)."""
    monkeypatch.setattr(timing, "time", _Clock(step_s))
    timer = timing.StepTimer(warmup, seconds)
    trainer, module = SimpleNamespace(global_step=0, should_stop=False), SimpleNamespace(device=torch.device("cpu"))
    timer.on_train_start(trainer, module)
    for step in range(1, max_steps + 1):
        trainer.global_step = step
        timer.on_train_batch_end(trainer, module)
        if trainer.should_stop:
            return timer.times, step
    return timer.times, None


def test_short_steps_are_timed_as_before_and_long_ones_fewer(monkeypatch):
    # Milliseconds a step: every step after the warm-up, the fit's whole length (warmup + steps + 1).
    times, stopped = _timed(monkeypatch, 1e-3, warmup=5, seconds=0.5, max_steps=16)
    assert len(times) == 11 and stopped is None
    # 0.3 s a step: the warm-up ends after 0.6 s (steps 1 and 2), the timing after 3 steps (0.9 s).
    times, stopped = _timed(monkeypatch, 0.3, warmup=5, seconds=0.5, max_steps=16)
    assert times == pytest.approx([0.3] * 3) and stopped == 5
    # Seconds a step: never fewer than 3 timed, nor a warm-up of less than the first step.
    times, stopped = _timed(monkeypatch, 5.0, warmup=5, seconds=0.5, max_steps=16)
    assert len(times) == 3 and stopped == 4


def test_the_new_setting_at_its_default_leaves_older_folders_matching():
    assert "throughput_seconds" not in StudySettings(quick=True).fingerprint(0)
    assert StudySettings(quick=True, throughput_seconds=2.0).fingerprint(0)["throughput_seconds"] == 2.0


def test_an_sgd_model_is_measured_on_raw_gradients(batchlab, tmp_path):
    result = batchlab("study", "-c", STUDY, "--data.n_samples", "2304", "--data.val_fraction", "0.111111",
                      "--data.eval_batch_size", "256", *QUICK_TINY)
    assert result.code == 0, result.err
    gns = json.loads((tmp_path / "quick" / "gns.json").read_text())
    assert gns["preconditioner"] == "none" and not any("preconditioned" in p for p in gns["points"])
    assert json.loads((tmp_path / "quick" / "quick.json").read_text())["b_simple_preconditioner"] == "none"
    assert "raw per_example gradients" in result.out and "Adam" not in result.out
