"""Shared helpers for the tests: run the ``batchlab`` command in-process or as a subprocess, and read TensorBoard
event files back.

Every test runs offline, on the CPU unless parametrised for CUDA, inside its own ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from batchlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SEED = str(CONFIGS / "seed.yaml")
STUDY = str(CONFIGS / "study.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]

# Tests that start ``python -m batchlab...`` run it in tmp_path; a relative PYTHONPATH (``PYTHONPATH=src pytest``)
# would then find another batchlab, or none. Make it absolute so subprocesses import the code under test.
if os.environ.get("PYTHONPATH"):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        str(Path(p).resolve()) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p
    )

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("gpu", marks=cuda)]


def plain_trainer(root: Path, **kwargs) -> Trainer:
    """A CPU Trainer that logs, checkpoints and shows nothing, for tests that drive Lightning from Python."""
    return Trainer(default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", **{"max_epochs": 1, **kwargs})


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def batchlab(tmp_path, monkeypatch, capsys):
    """Run ``batchlab ARGS`` in-process with ``tmp_path`` as the working directory; return a ``Result``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["batchlab"])

    def run(*args: str) -> Result:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def command(*args: str) -> list[str]:
    """The ``batchlab ARGS`` command line for a subprocess."""
    return [sys.executable, "-m", "batchlab.cli", *args]


def command_env() -> dict[str, str]:
    """The environment for a ``batchlab`` subprocess: this checkout's sources first (whatever copy of batchlab is
    installed), and the tests folder, so that the command can load the test-only callbacks in ``probes``."""
    path = [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def run_command(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``batchlab ARGS`` as a subprocess in ``cwd`` and wait for it (needed where Lightning starts processes)."""
    return subprocess.run(
        command(*args), cwd=cwd, env=command_env(), capture_output=True, text=True, timeout=timeout
    )


def signal_a_study(cwd: Path, args: list[str], trials: Path, signum: int, after: int = 3) -> tuple[int, str, str]:
    """Run ``batchlab ARGS`` (a study) as a subprocess, send it ``signum`` once ``after`` trials are written in
    ``trials``, and return its exit status, stdout and stderr."""
    proc = subprocess.Popen(command(*args), cwd=cwd, env=command_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while len(list(trials.glob("*.json"))) < after:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, out, err


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file and folder under ``root`` with its bytes (None for a folder): equal snapshots, nothing changed."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(Path(root).rglob("*"))}


def run_dirs(root: Path, name: str = "seed") -> list[Path]:
    """The version folders of a TensorBoard logger, oldest first."""
    return sorted((Path(root) / "runs" / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def load_summary(log_dir: Path) -> dict:
    return json.loads((Path(log_dir) / "summary.json").read_text())


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in a run folder as ``{tag: [(step, value), ...]}``."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def hparams_plugin(log_dir: Path):
    """TensorBoard's HParams session data of a run: (hyperparameter names and values, metric tags)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    params, metric_tags = {}, []
    for raw in content.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        if data.HasField("session_start_info"):
            for k, v in data.session_start_info.hparams.items():
                params[k] = v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
        if data.HasField("experiment"):
            metric_tags += [m.name.tag for m in data.experiment.metric_infos]
    return params, metric_tags
