"""scripts/bench.py runs end to end on a tiny seed case and writes its JSON, its speed-piece variants take out
exactly their piece, and the pieces table applies the issue's rule; no timing is asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# slow: the default suite must stay under 5 minutes on 2 cores; the others cover this path there too.
@pytest.mark.slow
def test_bench_measures_each_variant_in_its_own_process_and_writes_json(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "bench.json"
    args = ["--cases", "seed", "--seed-epochs", "3", "--repeats", "1", "--no-process", "--json", str(out),
            "--variants", "notebook,floor,batchlab"]  # fmt: skip
    assert bench.main(args) == 0
    data = json.loads(out.read_text())
    runs = data["cases"]["seed"]["runs"]
    assert set(runs) == {"notebook", "floor", "batchlab"}
    for variant, (run,) in runs.items():
        assert "error" not in run, (variant, run)
        assert run["step_s"] > 0 and run["samples_per_s"] > 0 and run["process_peak_mb"] > 0
    run = runs["batchlab"][0]
    assert run["steps"] == 6 and run["fit_s"] > 0 and run["cpu_step_s"] > 0
    assert data["targets"] == [], "the seed case is a reference: no check rests on it"
    assert len(data["machine"]["load_avg_at_start"]) == len(data["machine"]["load_avg_at_end"]) == 3
    printed = capsys.readouterr().out
    assert "| seed (n=4, bs 2, cpu) | notebook |" in printed and "x floor" in printed
    assert "load average (1 min)" in printed


def test_batchlab_variants_are_the_seed_config_with_the_cases_data():
    bench = _bench()
    args = bench.batchlab_args(bench.CASES["1m"], "batchlab", "/tmp/x")
    assert args[:2] == ["-c", str(bench.SEED_CONFIG)]
    long = bench.batchlab_args(bench.CASES["1m"], "batchlab-long", "/tmp/x")
    assert long[long.index("--trainer.log_every_n_steps") + 1] == "50" and "--trainer.log_every_n_steps" not in args
    assert args[args.index("--data.n_samples") + 1] == "1000000"
    assert args[args.index("--data.batch_size") + 1] == "65536"
    assert args[args.index("--trainer.max_epochs") + 1] == "8"
    # The per-sample DataLoader is slow at 1M rows: fewer epochs, still one left out of its steady window.
    args = bench.batchlab_args(bench.CASES["1m"], "batchlab-dataloader", "/tmp/x")
    assert args[args.index("--trainer.max_epochs") + 1] == "3"


def test_gpu_variants_shuffle_on_the_device_and_compile_with_cuda_graphs():
    bench = _bench()
    args = bench.batchlab_args(bench.CASES["gpu16m"], "batchlab-compiled", "/tmp/x")
    assert args[args.index("--data.device_shuffle") + 1] == "true"
    assert args[args.index("--model.compile") + 1] == "reduce-overhead"
    assert args[args.index("--trainer.accelerator") + 1] == "gpu"


def test_the_lightning_loop_reference_trains_the_same_steps_with_nothing_of_batchlabs_on_it(tmp_path, monkeypatch):
    bench = _bench()
    monkeypatch.chdir(tmp_path)  # in this process: a worker's own process would cost more than the run
    run = bench.work_lightning_loop(bench.Case(None, 2, 3, 0))
    assert run["steps"] == 6 and run["step_s"] > 0 and run["cpu_step_s"] > 0 and run["fit_s"] > 0
    assert not list(tmp_path.iterdir()), "no logger, no checkpoint: nothing written"


def test_each_piece_variant_runs_the_same_fit_without_its_piece_and_puts_it_back(tmp_path, monkeypatch):
    bench = _bench()
    from batchlab import data

    monkeypatch.chdir(tmp_path)  # in this process: a worker's own process would cost more than the run
    monkeypatch.setattr(data, "PACK_MIN_BYTES", 0)  # so that the seed's four points are packed
    tensor_batches = data.TensorBatches
    case = bench.Case(None, 2, 3, 0)
    runs = {v: bench.work_batchlab(case, v) for v in ("batchlab", "batchlab-unpacked", "batchlab-dataloader")}
    assert {v: (r["tensor_batches"], r["packed"]) for v, r in runs.items()} == {
        "batchlab": (True, True),
        "batchlab-unpacked": (True, False),
        "batchlab-dataloader": (False, False),
    }
    for variant, run in runs.items():
        assert run["steps"] == 6 and run["step_s"] > 0 and run["cpu_step_s"] > 0, variant
    assert data.TensorBatches is tensor_batches and data.PACK_MIN_BYTES == 0, "each patch is undone after its fit"
    result = bench.CaseResult({v: [r] for v, r in runs.items()})
    rows = bench.pieces({"seed": result})
    assert [(r["with"], r["without"], r["on"], r["passes"]) for r in rows] == [
        ("batchlab-unpacked", "batchlab-dataloader", True, False),  # seed is no case of the rule
        ("batchlab", "batchlab-unpacked", True, False),
    ]


def _run(step_s, **flags):
    return {"step_s": step_s, "cpu_step_s": step_s, "tensor_batches": True, "packed": True, **flags}


def test_a_piece_passes_where_it_saves_a_tenth_of_a_step_at_100k_or_1m_within_each_repeat():
    bench = _bench()
    results = {
        # Per repeat, packed saves 10% and 25% (median 17.5%) at 100k; 5% at 1m; the sliced batches 50% at 1m.
        "100k": bench.CaseResult({
            "batchlab": [_run(0.9), _run(1.5)],
            "batchlab-unpacked": [_run(1.0, packed=False), _run(2.0, packed=False)],
        }),
        "1m": bench.CaseResult({
            "batchlab": [_run(0.95)],
            "batchlab-unpacked": [_run(1.0, packed=False)],
            "batchlab-dataloader": [_run(2.0, packed=False, tensor_batches=False)],
        }),
    }  # fmt: skip
    rows = {(r["with"], r["case"]): r for r in bench.pieces(results)}
    assert set(rows) == {("batchlab", "100k"), ("batchlab", "1m"), ("batchlab-unpacked", "1m")}
    packed_100k = rows[("batchlab", "100k")]
    assert packed_100k["saving"] == pytest.approx(0.175) and packed_100k["passes"]
    assert rows[("batchlab", "1m")]["saving"] == pytest.approx(0.05) and not rows[("batchlab", "1m")]["passes"]
    sliced_1m = rows[("batchlab-unpacked", "1m")]
    assert sliced_1m["saving"] == pytest.approx(0.5) and sliced_1m["passes"]
    assert set(bench.verdicts(bench.pieces(results)).values()) == {True}
    table = bench.pieces_table(bench.pieces(results))
    assert packed_100k["savings_per_repeat"] == pytest.approx([0.1, 0.25])
    assert "| 1m | batchlab | batchlab-unpacked | 950.0000 | 1000.0000 | 5.0% | 5% | 5.0% | NO |" in table

    # A piece that was not on in its own variant (data below the packing threshold) is off, whatever the times say.
    results["1m"].runs["batchlab"] = [_run(0.5, packed=False)]
    (row,) = [r for r in bench.pieces(results) if r["with"] == "batchlab" and r["case"] == "1m"]
    assert not row["on"] and not row["passes"]
    results.pop("100k")
    assert bench.verdicts(bench.pieces(results))["packed copy gather (data above PACK_MIN_BYTES)"] is None


def test_repeats_alternate_the_order_of_the_variants(monkeypatch):
    bench = _bench()
    order = []

    def worker(case, variant, timeout, threads):
        order.append(variant)
        return {"step_s": 1.0}

    monkeypatch.setattr(bench, "spawn_worker", worker)
    results = bench.bench_cases(["seed"], ["floor", "batchlab", "batchlab-unpacked"], 3, 1.0)
    forward = ["floor", "batchlab", "batchlab-unpacked"]
    assert order == forward + forward[::-1] + forward
    assert {v: len(runs) for v, runs in results["seed"].runs.items()} == dict.fromkeys(forward, 3)
