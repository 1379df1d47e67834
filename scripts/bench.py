"""The speed benchmark: batchlab's fit beside the notebook's loop and the eager floor, side by side in one run.

    python scripts/bench.py --threads 1 --repeats 3 --cases seed,100k,1m   # the run docs/performance.md reports
    python scripts/bench.py --cases seed --repeats 5      # one case, more repeats
    python scripts/bench.py --cases 1m --variants floor,batchlab --no-process
    python scripts/bench.py --json results.json           # where the JSON goes (default: bench.json, git-ignored)

Cases (``--cases``):

- ``seed``: the notebook's four points at batch size 2 (``--seed-epochs`` epochs, 500 by default, so that the steady
  state holds ~1000 steps instead of the seed's 100); a reference, no target rests on it;
- ``100k``: 100,000 synthetic samples at batch size 1024; ``1m``: 1,000,000 at 65,536;
- ``gpu16m``: 16M samples at 1M per batch on CUDA, with a CUDA-graph floor (skipped without CUDA).

Variants (``--variants``): ``notebook`` (``batchlab.notebook.train``: per-sample Dataset + DataLoader), ``floor``
(the notebook's model and SGD on batches sliced from in-memory tensors by a permutation: no framework),
``batchlab`` (``batchlab fit -c configs/seed.yaml`` with the case's data); on the GPU also ``graph-floor`` (the
floor's whole step captured in one CUDA graph) and ``batchlab-compiled`` (``batchlab`` plus ``--model.compile
reduce-overhead``); ``lightning-loop``, a reference for what the Trainer's loop alone costs: the same model on the
same data, in a Trainer with no
logger, checkpoint, progress bar, model summary or profiler and none of batchlab's callbacks (no TensorBoard, no
``RunSummary``), so no configuration of a Lightning fit can step faster. Batchlab variants on the GPU
shuffle on the device (``--data.device_shuffle true``), as the floor does. ``batchlab-long`` is ``batchlab`` as a
long run would be configured: a loss point every 50 steps (Lightning's default) instead of the seed's every step,
and no progress bar; the seed's every-step logging is a choice for its 100-step run, not a cost of batchlab.

Speed pieces: each piece of batchlab's data path that exists for speed is measured with and without it, as the
same ``batchlab`` fit with the piece taken out by the worker process (``without_piece``; no user-facing option):

- ``batchlab-unpacked``: the packed copy gather (``data._row_store``, above ``PACK_MIN_BYTES``) off, so shuffled
  batches are gathered tensor by tensor;
- ``batchlab-dataloader``: ``DataLoader(TensorDataset(x, y), batch_size, shuffle=True)`` (per-sample indexing and
  collate) instead of ``TensorBatches``.

The pieces table compares, within each repeat, the step with a piece to the step without it: the sliced batches
as ``batchlab-unpacked`` against ``batchlab-dataloader`` (the packed gather off in both), the packed gather as
``batchlab`` against ``batchlab-unpacked``. The saving is in % of the step without the piece; the issue's rule
keeps a piece that saves at least ``KEEP_SAVING`` of a step at 100k or at 1m. A piece that is off in a case (the
packed gather below ``PACK_MIN_BYTES``) shows as ``off``; its two variants then run the same code, and their
difference is the run's noise.

How it measures, and why:

- Each measurement runs in its own subprocess (this script with ``--worker``), so that every variant has its own
  peak memory and none inherits another's warm caches or allocator state.
- Steady state excludes the first epoch (warm-up, lazy initialisation, compilation). For batchlab it is
  ``RunSummary``'s ``step_s`` (first epoch end to train end), for the floor the same span timed in the loop; the
  whole ``trainer.fit`` call is reported too. The notebook loop is timed whole, as the notebook does.
- Peak memory: the resident-set high-water mark. ``/proc/self/clear_refs`` resets it just before the measured
  work, so ``train MB`` is what data creation plus training added to the process (batchlab creates its data in
  ``setup``, inside ``fit``; the floor creates it with the same function inside its window). ``process MB`` is the
  whole process's peak, imports included. On CUDA: peak allocated memory.
- The machine may be shared: every repeat runs all variants back to back, ratios are taken within a repeat, and
  the table shows the median over repeats (times too). Compare ratios, not absolute times. Beside wall time, the
  steady window's process CPU time (all threads) is compared too: on a machine whose cores other work also
  wants, wall time mostly measures the neighbours, CPU time what each variant itself spent (use ``--threads 1``
  so that a variant's CPU time is not inflated by spinning OpenMP workers). On a GPU only wall time counts.
  The load average is recorded at the start and at the end of the run; a start above ``BUSY_LOAD`` per core is
  flagged as a busy machine.
- Whole process: ``batchlab fit -c configs/seed.yaml`` and ``python -m batchlab.notebook`` as subprocesses,
  interpreter start and imports included, alternated ``--process-repeats`` times; medians and their ratio.

Only ratios from one run mean anything: run it again rather than comparing with figures from another day. The
output is Markdown: docs/performance.md holds a run's tables and says how to redo it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
SEED_CONFIG = ROOT / "configs" / "seed.yaml"
RESULT_TAG = "BENCH_RESULT "


@dataclass
class Case:
    """One data size and batch size.

    Args:
        n: Training samples; None is the notebook's four points.
        batch_size: Samples per step.
        epochs: Epochs of the floor and batchlab runs (the first is excluded from the steady state).
        notebook_epochs: Epochs of the notebook loop (it is slow at large sizes); 0 skips it.
        device: ``cpu`` or ``cuda``.
        dataloader_epochs: Epochs of ``batchlab-dataloader``, whose per-sample loader is slow at large sizes
            (its steady step is still timed from the first epoch's end); None: ``epochs``.
    """

    n: Optional[int]
    batch_size: int
    epochs: int
    notebook_epochs: int
    device: str = "cpu"
    dataloader_epochs: Optional[int] = None

    @property
    def rows(self) -> int:
        return 4 if self.n is None else self.n

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    def epochs_of(self, variant: str) -> int:
        """Epochs a fit of this variant runs."""
        if variant == "batchlab-dataloader" and self.dataloader_epochs is not None:
            return self.dataloader_epochs
        return self.epochs


CASES = {
    "seed": Case(None, 2, 500, 500),
    "100k": Case(100_000, 1024, 8, 2),
    "1m": Case(1_000_000, 65_536, 8, 1, dataloader_epochs=3),
    # The per-sample notebook loop would take minutes per epoch at 16M samples; it is left out there.
    "gpu16m": Case(1 << 24, 1 << 20, 5, 0, device="cuda"),
}
CPU_VARIANTS = ["notebook", "floor", "lightning-loop", "batchlab", "batchlab-long", "batchlab-unpacked",
                "batchlab-dataloader"]
GPU_VARIANTS = ["floor", "graph-floor", "batchlab", "batchlab-compiled"]


@dataclass(frozen=True)
class Piece:
    """A speed piece of batchlab's, measured as two variants that differ by it alone.

    Args:
        name: What the piece is.
        with_variant: The fit with the piece.
        without_variant: The same fit without it.
        on_key: The worker result's flag that says the piece was in use: a comparison where the ``with`` run does
            not have it, or the ``without`` run does, shows the piece as off.
    """

    name: str
    with_variant: str
    without_variant: str
    on_key: str


PIECES = [
    Piece("sliced tensor batches (TensorBatches, not DataLoader(TensorDataset))", "batchlab-unpacked",
          "batchlab-dataloader", "tensor_batches"),
    Piece("packed copy gather (data above PACK_MIN_BYTES)", "batchlab", "batchlab-unpacked", "packed"),
]  # fmt: skip
KEEP_SAVING = 0.10  # the rule: a piece stays if it saves this share of a step at 100k or 1m
RULE_CASES = ("100k", "1m")
BUSY_LOAD = 0.25  # load average per core above which the run is flagged as on a busy machine


# ----------------------------------------------------------------------------------------------------------------
# Workers: one measurement each, in its own process.


def _status_kb(field_name: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the work inside ``with``: resident set on the CPU (high-water mark reset at entry), peak
    allocated memory on CUDA."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.result: dict[str, Any] = {}

    def __enter__(self) -> PeakMemory:
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda0 = torch.cuda.memory_allocated()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux)
            self._reset = True
        except OSError:
            self._reset = False
        self._rss0 = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        import resource

        import torch

        hwm = _status_kb("VmHWM")
        self.result = {
            "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "train_peak_mb": (hwm - self._rss0) / 1024 if self._reset and hwm and self._rss0 else None,
        }
        if self.device == "cuda":
            self.result["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - self._cuda0) / 2**20


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _warm_up(device: str) -> None:
    """One throwaway training step, before any measurement window: torch initialises parts of itself lazily on
    first use (autograd, the optimizer's dynamo guard imports ``torch._dynamo``, ~100 MB), and that one-time cost
    belongs to no variant. Lightning's imports happen to trigger some of it, which would otherwise flatter
    batchlab's memory figures."""
    import torch

    from batchlab.notebook import MyNeuralNet

    net = MyNeuralNet().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    opt.zero_grad()
    torch.nn.functional.mse_loss(net(torch.ones(2, 2, device=device)), torch.ones(2, 1, device=device)).backward()
    opt.step()
    _sync(device)


def _data(case: Case):
    """The case's data as ``ToyRegressionData(n_samples=n).full_data()`` makes it, without importing Lightning
    (the plain loops' processes hold torch only, as the notebook's does)."""
    import torch

    from batchlab.notebook import NOTEBOOK_X, NOTEBOOK_Y
    from batchlab.synthetic import make_synthetic

    if case.n is None:
        return torch.tensor(NOTEBOOK_X), torch.tensor(NOTEBOOK_Y)
    return make_synthetic(case.n)


def work_notebook(case: Case) -> dict[str, Any]:
    from batchlab import notebook

    with PeakMemory(case.device) as mem:
        x, y = _data(case)
        cpu0 = time.process_time()
        _, _, seconds = notebook.train(x, y, case.batch_size, case.notebook_epochs, seed=0, device=case.device)
        cpu = time.process_time() - cpu0
    samples = case.rows * case.notebook_epochs
    steps = case.steps_per_epoch * case.notebook_epochs
    return {
        "step_s": seconds / steps,
        "samples_per_s": samples / seconds,
        "cpu_step_s": cpu / steps,
        "loop_s": seconds,
        **mem.result,
    }


def _floor_model(device: str):
    import torch
    from torch import nn

    from batchlab.notebook import MyNeuralNet

    torch.manual_seed(0)
    net = MyNeuralNet().to(device)
    return net, torch.optim.SGD(net.parameters(), lr=1e-3), nn.MSELoss()


def work_floor(case: Case) -> dict[str, Any]:
    """The eager floor: the notebook's net and SGD, batches gathered from a fresh permutation every epoch."""
    import torch

    with PeakMemory(case.device) as mem:
        x, y = (t.to(case.device) for t in _data(case))
        net, opt, loss_fn = _floor_model(case.device)
        n, b = len(x), case.batch_size
        epoch_s, epoch_cpu = [], []
        for _ in range(case.epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            perm = torch.randperm(n, device=case.device)
            for start in range(0, n, b):
                idx = perm[start : start + b]
                xb, yb = x.index_select(0, idx), y.index_select(0, idx)
                opt.zero_grad()
                loss = loss_fn(net(xb), yb)
                loss.backward()
                opt.step()
            _sync(case.device)
            epoch_s.append(time.perf_counter() - t0)
            epoch_cpu.append(time.process_time() - c0)
    return _steady(case, epoch_s, epoch_cpu, mem.result)


def work_graph_floor(case: Case) -> dict[str, Any]:
    """The whole step (gather, forward, backward, SGD) captured once in a CUDA graph and replayed per batch.

    Follows PyTorch's whole-network capture recipe: warm up on a side stream, capture with static inputs
    (here the index vector of the batch), then per step copy the next indices in and replay.
    """
    import torch

    assert case.device == "cuda" and case.rows % case.batch_size == 0, "graph floor needs CUDA and full batches"
    with PeakMemory(case.device) as mem:
        x, y = (t.to(case.device) for t in _data(case))
        net, opt, loss_fn = _floor_model(case.device)
        n, b = len(x), case.batch_size
        static_idx = torch.arange(b, device=case.device)

        def step() -> torch.Tensor:
            xb, yb = x.index_select(0, static_idx), y.index_select(0, static_idx)
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
            return loss

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            step()
        epoch_s, epoch_cpu = [], []
        for _ in range(case.epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            perm = torch.randperm(n, device=case.device)
            for start in range(0, n, b):
                static_idx.copy_(perm[start : start + b])
                # The captured backward accumulates into the same gradient buffers; SGD reads them, and the
                # next replay's backward overwrites them (captured with grads set to None, so no accumulation).
                graph.replay()
            _sync(case.device)
            epoch_s.append(time.perf_counter() - t0)
            epoch_cpu.append(time.process_time() - c0)
    return _steady(case, epoch_s, epoch_cpu, mem.result)


def _steady(case: Case, epoch_s: list[float], epoch_cpu: list[float], mem: dict[str, Any]) -> dict[str, Any]:
    first = 1 if len(epoch_s) > 1 else 0
    steady, cpu = sum(epoch_s[first:]), sum(epoch_cpu[first:])
    steps = case.steps_per_epoch * (len(epoch_s) - first)
    return {
        "step_s": steady / steps,
        "samples_per_s": case.rows * (len(epoch_s) - first) / steady,
        "cpu_step_s": cpu / steps,
        "loop_s": sum(epoch_s),
        **mem,
    }


def batchlab_args(case: Case, variant: str, save_dir: str) -> list[str]:
    """The ``batchlab fit`` arguments of a variant (without ``fit``): the seed config with the case's data."""
    args = ["-c", str(SEED_CONFIG)]
    if variant == "batchlab-compiled":
        args += ["--model.compile", "reduce-overhead"]
    if variant == "batchlab-long":
        args += ["--trainer.log_every_n_steps", "50", "--trainer.enable_progress_bar", "false"]
    if case.n is not None:
        args += ["--data.n_samples", str(case.n)]
    if case.device == "cuda":
        # The floor draws its permutation on the GPU; so must batchlab, or a CPU randperm of 16M rows would be
        # most of every epoch.
        args += ["--data.device_shuffle", "true"]
    args += [
        "--data.batch_size", str(case.batch_size),
        "--trainer.max_epochs", str(case.epochs_of(variant)),
        "--trainer.accelerator", "gpu" if case.device == "cuda" else "cpu",
        "--trainer.logger.init_args.save_dir", save_dir,
        "--seed_everything", "0",
    ]  # fmt: skip
    return args


def _cpu_clock():
    """A callback that reads the process's CPU time (and wall time) over RunSummary's steady window (first epoch
    end to train end); appended after RunSummary, so its end mark also covers RunSummary's last log writes."""
    from lightning.pytorch import Callback

    class CpuClock(Callback):
        start: Optional[float] = None
        wall_start: Optional[float] = None
        cpu_s: Optional[float] = None
        wall_s: Optional[float] = None

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if self.start is None:
                self.start, self.wall_start = time.process_time(), time.perf_counter()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.start is not None:
                self.cpu_s = time.process_time() - self.start
                self.wall_s = time.perf_counter() - self.wall_start

    return CpuClock()


@contextlib.contextmanager
def without_piece(variant: str) -> Iterator[None]:
    """Inside ``with``: batchlab as a variant runs it, with one speed piece taken out (see ``PIECES``); other
    variants leave it as it is. Patched, and restored at exit, so that a test may run a variant inside the test's
    own process.
    """
    from unittest import mock

    from torch.utils.data import DataLoader, TensorDataset

    from batchlab import data

    def dataloader(tensors: Any, batch_size: int, shuffle: bool = False, drop_last: bool = False, *_: Any) -> Any:
        # What TensorBatches replaces: a sample at a time through TensorDataset.__getitem__, then default_collate.
        return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)

    if variant == "batchlab-unpacked":
        patch = mock.patch.object(data, "PACK_MIN_BYTES", math.inf)
    elif variant == "batchlab-dataloader":
        patch = mock.patch.object(data, "TensorBatches", dataloader)
    else:
        patch = contextlib.nullcontext()
    with patch:
        yield


def work_batchlab(case: Case, variant: str) -> dict[str, Any]:
    """``batchlab fit`` in-process as the command builds it (``make_cli``), timing the ``fit`` call."""
    from batchlab.cli import make_cli
    from batchlab.data import TensorBatches
    from batchlab.quiet import drop_noise
    from batchlab.summary import RunSummary

    drop_noise()
    epochs = case.epochs_of(variant)
    with tempfile.TemporaryDirectory() as save_dir, without_piece(variant):
        # run=False: LightningCLI parses and builds everything (seeding included) but leaves ``fit`` to us.
        cli = make_cli(batchlab_args(case, variant, save_dir), run=False)
        clock = _cpu_clock()
        cli.trainer.callbacks.append(clock)
        with PeakMemory(case.device) as mem:
            t0 = time.perf_counter()
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            _sync(case.device)
            fit_s = time.perf_counter() - t0
        (summary,) = [c.summary for c in cli.trainer.callbacks if isinstance(c, RunSummary)]
        loader = cli.trainer.train_dataloader
    step_s = summary.step_s
    steady_steps = case.steps_per_epoch * (epochs - 1)
    return {
        "step_s": step_s,
        "cpu_step_s": clock.cpu_s / steady_steps if clock.cpu_s is not None and steady_steps else None,
        "samples_per_s": case.rows / (step_s * case.steps_per_epoch),
        "fit_s": fit_s,
        "fit_samples_per_s": case.rows * epochs / fit_s,
        "steps": summary.steps,
        # Which pieces the fit ran with, from the loader it trained on: what the pieces table checks.
        "tensor_batches": isinstance(loader, TensorBatches),
        "packed": isinstance(loader, TensorBatches) and loader._rows is not None,
        **mem.result,
    }


def work_lightning_loop(case: Case) -> dict[str, Any]:
    """Lightning's loop with nothing on it: ``MLPRegressor()`` and ``ToyRegressionData`` in a bare
    Trainer, timed over the same steady window as batchlab (first epoch end to train end)."""
    from lightning.pytorch import Trainer, seed_everything

    from batchlab.data import ToyRegressionData
    from batchlab.model import MLPRegressor
    from batchlab.quiet import drop_noise

    drop_noise()
    seed_everything(0, verbose=False)
    clock = _cpu_clock()
    trainer = Trainer(
        accelerator="gpu" if case.device == "cuda" else "cpu",
        devices=1,
        max_epochs=case.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    data = ToyRegressionData(batch_size=case.batch_size, n_samples=case.n, device_shuffle=case.device == "cuda")
    with PeakMemory(case.device) as mem:
        t0 = time.perf_counter()
        trainer.fit(MLPRegressor(), datamodule=data)
        _sync(case.device)
        fit_s = time.perf_counter() - t0
    steady_steps = case.steps_per_epoch * (case.epochs - 1)
    if not steady_steps or clock.wall_s is None:
        raise SystemExit("lightning-loop needs at least 2 epochs: the first is left out of the steady state")
    step_s = clock.wall_s / steady_steps
    return {
        "step_s": step_s,
        "cpu_step_s": clock.cpu_s / steady_steps,
        "samples_per_s": case.rows / (step_s * case.steps_per_epoch),
        "fit_s": fit_s,
        "fit_samples_per_s": case.rows * case.epochs / fit_s,
        "steps": trainer.global_step,
        **mem.result,
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    case = Case(**spec["case"])
    variant = spec["variant"]
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    _warm_up(case.device)  # every variant seeds itself afterwards
    import batchlab.synthetic  # noqa: F401 (imported outside the memory window)
    if variant == "notebook":
        return work_notebook(case)
    if variant == "floor":
        return work_floor(case)
    if variant == "graph-floor":
        return work_graph_floor(case)
    if variant == "lightning-loop":
        return work_lightning_loop(case)
    return work_batchlab(case, variant)


# ----------------------------------------------------------------------------------------------------------------
# The driver: workers in subprocesses, interleaved; the table and the JSON.


MMAP_THRESHOLD: Optional[int] = None  # --malloc-mmap-threshold


def _env() -> dict[str, str]:
    # Workers import the batchlab of this checkout, whatever is installed.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    if MMAP_THRESHOLD is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    return env


def spawn_worker(case: Case, variant: str, timeout: float, threads: Optional[int] = None) -> dict[str, Any]:
    spec = json.dumps({"case": asdict(case), "variant": variant, "threads": threads})
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", spec],
            cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def _median(values: list[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


@dataclass
class CaseResult:
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def median(self, variant: str, key: str) -> Optional[float]:
        return _median([r.get(key) for r in self.runs.get(variant, [])])

    def ratios(self, variant: str, key: str, base: str = "floor", invert: bool = False) -> list[float]:
        """``variant[key] / base[key]`` (or its inverse) in each repeat that measured both."""
        pairs = zip(self.runs.get(variant, []), self.runs.get(base, []))
        return [b[key] / a[key] if invert else a[key] / b[key] for a, b in pairs if a.get(key) and b.get(key)]

    def ratio(self, variant: str, key: str, base: str = "floor", invert: bool = False) -> Optional[float]:
        """Median over repeats of ``variant[key] / base[key]`` taken within each repeat."""
        return _median(self.ratios(variant, key, base, invert))


def bench_cases(
    names: list[str], variants: Optional[list[str]], repeats: int, timeout: float, threads: Optional[int] = None
) -> dict[str, CaseResult]:
    import torch

    results: dict[str, CaseResult] = {}
    for name in names:
        case = CASES[name]
        if case.device == "cuda" and not torch.cuda.is_available():
            print(f"[{name}] skipped: no CUDA device", flush=True)
            continue
        wanted = variants or (GPU_VARIANTS if case.device == "cuda" else CPU_VARIANTS)
        if case.notebook_epochs == 0:
            wanted = [v for v in wanted if v != "notebook"]
        if case.device != "cuda":
            wanted = [v for v in wanted if v not in ("graph-floor", "batchlab-compiled")]
        result = results[name] = CaseResult()
        for rep in range(repeats):
            # Every other repeat in reverse, so that a load that grows or falls over a repeat does not always favour
            # the variant that runs first in a pair compared within the repeat.
            for variant in wanted if rep % 2 == 0 else wanted[::-1]:
                t0 = time.perf_counter()
                run = spawn_worker(case, variant, timeout, threads)
                result.runs.setdefault(variant, []).append(run)
                shown = run.get("error") or f"{run['step_s'] * 1e3:.4f} ms/step"
                print(f"[{name} {rep + 1}/{repeats}] {variant:<19} {shown}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return results


def bench_process(repeats: int, timeout: float) -> dict[str, Any]:
    """Whole processes, interpreter start included: the seed run as the README's command, and the notebook."""
    commands = {
        "notebook": [sys.executable, "-m", "batchlab.notebook"],
        "batchlab": [sys.executable, "-m", "batchlab.cli", "fit", "-c", str(SEED_CONFIG)],
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in commands}
    with tempfile.TemporaryDirectory() as cwd:
        for rep in range(repeats):
            for name, cmd in commands.items():
                with tempfile.TemporaryFile() as err:
                    t0 = time.perf_counter()
                    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
                    # wait4 gives this child's own peak RSS, which getrusage(RUSAGE_CHILDREN) would not.
                    _, status, usage = os.wait4(proc.pid, 0)
                    wall = time.perf_counter() - t0
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    if proc.returncode != 0:
                        err.seek(0)
                        last = err.read().decode(errors="replace").strip().splitlines()[-1:]
                        raise RuntimeError(f"{' '.join(cmd)} failed with exit {proc.returncode}: {last}")
                runs[name].append({"wall_s": wall, "peak_mb": usage.ru_maxrss / 1024})
                print(f"[process {rep + 1}/{repeats}] {name:<14} {wall:.2f} s", flush=True)
    out: dict[str, Any] = {"runs": runs}
    for name in commands:
        out[name] = {
            "wall_s": _median([r["wall_s"] for r in runs[name]]),
            "peak_mb": _median([r["peak_mb"] for r in runs[name]]),
        }
    for name in ("batchlab",):
        out[f"{name}_vs_notebook"] = out[name]["wall_s"] / out["notebook"]["wall_s"]
    return out


def _fmt(v: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def table(results: dict[str, CaseResult]) -> str:
    head = (
        "| case | variant | ms/step (steady) | samples/s | x floor (throughput) | x floor (CPU time) | "
        "fit() samples/s | train MB | x floor (train MB) | process MB |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in results.items():
        case = CASES[name]
        label = f"{name} (n={case.rows:,}, bs {case.batch_size:,}, {case.device})"
        for variant in res.runs:
            mem_key = "cuda_peak_mb" if case.device == "cuda" else "train_peak_mb"
            lines.append(
                "| "
                + " | ".join(
                    [
                        label,
                        variant,
                        _fmt(res.median(variant, "step_s") and res.median(variant, "step_s") * 1e3, ".4f"),
                        _fmt(res.median(variant, "samples_per_s"), ",.0f"),
                        _fmt(res.ratio(variant, "samples_per_s"), ".2f", "x"),
                        _fmt(res.ratio(variant, "cpu_step_s", invert=True), ".2f", "x"),
                        _fmt(res.median(variant, "fit_samples_per_s"), ",.0f"),
                        _fmt(res.median(variant, mem_key), ".1f"),
                        _fmt(res.ratio(variant, mem_key), ".2f", "x"),
                        _fmt(res.median(variant, "process_peak_mb"), ".0f"),
                    ]
                )
                + " |"
            )
            label = ""
    return "\n".join(lines)


def targets(results: dict[str, CaseResult], process: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each as measured in this run."""
    out = []

    def add(name: str, value: Optional[float], limit: float, at_most: bool) -> None:
        met = None if value is None else (value <= limit if at_most else value >= limit)
        out.append({"target": name, "value": value, "limit": limit, "at_most": at_most, "met": met})

    if "1m" in results:
        res = results["1m"]
        for v in ("batchlab", "batchlab-long"):
            add(f"1m bs 65536: {v} throughput / floor", res.ratio(v, "samples_per_s"), 0.9, False)
            add(f"1m bs 65536: {v} throughput / floor, CPU time", res.ratio(v, "cpu_step_s", invert=True), 0.9, False)
        # The bound no Lightning fit beats, for reading the two above.
        add("1m bs 65536: lightning-loop (reference) throughput / floor", res.ratio("lightning-loop", "samples_per_s"),
            0.9, False)
        add("1m bs 65536: batchlab train peak MB / floor", res.ratio("batchlab", "train_peak_mb"), 1.5, True)
        add("1m bs 65536: batchlab process peak MB / floor", res.ratio("batchlab", "process_peak_mb"), 1.5, True)
    if "gpu16m" in results:
        for v in ("batchlab", "batchlab-compiled"):
            add(
                f"gpu16m bs 1M: {v} throughput / graph floor",
                results["gpu16m"].ratio(v, "samples_per_s", base="graph-floor"),
                0.5,
                False,
            )
    if process:
        add("process: batchlab fit -c seed.yaml / notebook script", process["batchlab_vs_notebook"], 2.5, True)
    return out


def pieces(results: dict[str, CaseResult]) -> list[dict[str, Any]]:
    """Each speed piece in each case: the steady step with and without it, and the share of the step it saves."""
    out = []
    for piece in PIECES:
        for name, res in results.items():
            with_runs, without_runs = res.runs.get(piece.with_variant, []), res.runs.get(piece.without_variant, [])
            if not with_runs or not without_runs:
                continue
            on = all(r.get(piece.on_key) for r in with_runs) and not any(r.get(piece.on_key) for r in without_runs)
            per_repeat = [1 - r for r in res.ratios(piece.with_variant, "step_s", base=piece.without_variant)]
            cpu_ratio = res.ratio(piece.with_variant, "cpu_step_s", base=piece.without_variant)
            saving = _median(per_repeat)
            out.append({
                "piece": piece.name,
                "case": name,
                "with": piece.with_variant,
                "without": piece.without_variant,
                "with_step_s": res.median(piece.with_variant, "step_s"),
                "without_step_s": res.median(piece.without_variant, "step_s"),
                "saving": saving,
                "savings_per_repeat": per_repeat,
                "cpu_saving": None if cpu_ratio is None else 1 - cpu_ratio,
                "on": on,
                "rule_case": name in RULE_CASES,
                "passes": on and name in RULE_CASES and saving is not None and saving >= KEEP_SAVING,
            })  # fmt: skip
    return out


def verdicts(rows: list[dict[str, Any]]) -> dict[str, Optional[bool]]:
    """Per piece: True where it passes the rule in a rule case, False where it was measured in one and does not,
    None where no rule case measured it."""
    out: dict[str, Optional[bool]] = {}
    for row in rows:
        if row["rule_case"] and row["on"]:
            out[row["piece"]] = out.get(row["piece"]) or row["passes"]
        else:
            out.setdefault(row["piece"], None)
    return out


def pieces_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| piece | case | with | without | ms/step with | ms/step without | saving (wall) | per repeat | "
        f"saving (CPU time) | >= {KEEP_SAVING:.0%} |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if not r["on"]:
            passes = "off here (both run the same code: noise)"
        elif not r["rule_case"]:
            passes = "reference (no rule)"
        else:
            passes = "yes" if r["passes"] else "NO"
        lines.append(
            f"| {r['piece']} | {r['case']} | {r['with']} | {r['without']} | "
            f"{_fmt(r['with_step_s'] and r['with_step_s'] * 1e3, '.4f')} | "
            f"{_fmt(r['without_step_s'] and r['without_step_s'] * 1e3, '.4f')} | "
            f"{_fmt(r['saving'] and r['saving'] * 100, '.1f', '%')} | "
            f"{', '.join(f'{v:.0%}' for v in r['savings_per_repeat']) or '-'} | "
            f"{_fmt(r['cpu_saving'] and r['cpu_saving'] * 100, '.1f', '%')} | {passes} |"
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> Optional[list[float]]:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def machine() -> dict[str, Any]:
    import lightning
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_start": _load(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every variant (default 3)")
    parser.add_argument("--seed-epochs", type=int, default=CASES["seed"].epochs, help="epochs of the seed case")
    parser.add_argument("--process-repeats", type=int, default=5, help="whole-process runs of each command")
    parser.add_argument("--no-process", action="store_true", help="skip the whole-process comparison")
    parser.add_argument("--json", default="bench.json", help="where to write the results (default bench.json)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one measurement may take")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads in every measurement (default: torch's own). On a shared machine 1 is far\n"
        "steadier: a parallel kernel waits for its slowest thread, and a busy neighbour makes that one slow",
    )  # fmt: skip
    parser.add_argument(
        "--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
        help="set glibc's MALLOC_MMAP_THRESHOLD_ in the measurements (e.g. 131072): blocks above it go back to\n"
        "the OS when freed, so peak RSS shows live memory instead of what glibc's adaptive threshold keeps",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(RESULT_TAG + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0

    global MMAP_THRESHOLD
    MMAP_THRESHOLD = args.malloc_mmap_threshold
    CASES["seed"].epochs = CASES["seed"].notebook_epochs = args.seed_epochs
    names = [c for c in args.cases.split(",") if c]
    unknown = set(names) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}: choose from {', '.join(CASES)}")
    variants = args.variants.split(",") if args.variants else None
    info = machine()
    t0 = time.perf_counter()
    results = bench_cases(names, variants, args.repeats, args.timeout, args.threads)
    process = None if args.no_process else bench_process(args.process_repeats, args.timeout)
    goals = targets(results, process)
    piece_rows = pieces(results)
    info["load_avg_at_end"] = _load()

    load = " -> ".join(
        f"{info[k][0]:.2f}" if info[k] else "?" for k in ("load_avg_at_start", "load_avg_at_end")
    )
    print(f"\nmachine: {info['cpu']}, {info['cpus']} CPUs, {info['platform']}, torch {info['torch']}, "
          f"lightning {info['lightning']}" + (f", {info['cuda_device']}" if "cuda_device" in info else "")
          + f"; load average (1 min) {load}")  # fmt: skip
    start = info["load_avg_at_start"]
    if start and start[0] > BUSY_LOAD * (info["cpus"] or 1):
        print(f"busy machine: load {start[0]:.2f} on {info['cpus']} CPUs at the start; the times are provisional, "
              "only ratios within this run compare")  # fmt: skip
    print(
        f"medians of {args.repeats} interleaved repeats; x floor = ratio to the floor within a repeat, median; "
        f"torch threads: {args.threads or info['torch_threads']}"
        + (f"; MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if args.malloc_mmap_threshold else "")
        + "\n"
    )
    print(table(results))
    if process:
        print("\n| whole process (interpreter start included) | median s | peak MB | x notebook |")
        print("|---|---:|---:|---:|")
        for name, label in [
            ("notebook", "python -m batchlab.notebook"),
            ("batchlab", "batchlab fit -c configs/seed.yaml"),
        ]:
            ratio = process[name]["wall_s"] / process["notebook"]["wall_s"]
            print(f"| {label} | {process[name]['wall_s']:.2f} | {process[name]['peak_mb']:.0f} | {ratio:.2f}x |")
    if goals:
        print("\n| check | measured | limit | met |")
        print("|---|---:|---:|---|")
    for g in goals:
        sign = "<=" if g["at_most"] else ">="
        met = {True: "yes", False: "NO", None: "-"}[g["met"]]
        print(f"| {g['target']} | {_fmt(g['value'], '.2f', 'x')} | {sign} {g['limit']}x | {met} |")
    if piece_rows:
        print(f"\nspeed pieces (saving: share of the step without the piece, median of the repeats' ratios; the rule: "
              f">= {KEEP_SAVING:.0%} at {' or '.join(RULE_CASES)})\n")  # fmt: skip
        print(pieces_table(piece_rows))
        print()
        for name, kept in verdicts(piece_rows).items():
            verdict = {True: "passes the rule", False: "FAILS the rule", None: "not measured in a rule case"}[kept]
            print(f"- {name}: {verdict}")

    out = {
        "machine": info,
        "args": vars(args),
        "elapsed_s": time.perf_counter() - t0,
        "cases": {name: {"case": asdict(CASES[name]), "runs": res.runs} for name, res in results.items()},
        "process": process,
        "targets": goals,
        "pieces": piece_rows,
        "verdicts": verdicts(piece_rows),
    }
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.json} ({out['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
