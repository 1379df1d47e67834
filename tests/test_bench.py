"""scripts/bench.py runs end to end on a tiny seed case and writes its JSON; no timing is asserted."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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
    targets = {t["target"]: t for t in data["targets"]}
    assert targets["seed bs 2: batchlab steady step / floor step"]["value"] > 0
    printed = capsys.readouterr().out
    assert "| seed (n=4, bs 2, cpu) | notebook |" in printed and "x floor" in printed


def test_batchlab_variants_are_the_seed_config_with_the_cases_data():
    bench = _bench()
    args = bench.batchlab_args(bench.CASES["1m"], "batchlab", "/tmp/x")
    assert args[:2] == ["-c", str(bench.SEED_CONFIG)]
    assert args[args.index("--data.n_samples") + 1] == "1000000"
    assert args[args.index("--data.batch_size") + 1] == "65536"


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
