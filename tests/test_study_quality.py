"""scripts/study_quality.py scores folders of both summary.json formats: the in-band cross-check, the worst
measured/fitted regret ratio, the unbracketed count and the cost goals; and it runs one subprocess per study into
its own folder. Fake study folders only: no real study runs."""

import importlib.util
import json
import stat
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study_quality.py"


@pytest.fixture(scope="module")
def sq():
    spec = importlib.util.spec_from_file_location("study_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_quality"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def new_summary(rec=64, band=(32, 64, 128), quick_b=64, ratios=None, unbracketed=None, samples=20e6):
    """A reworked study's summary.json: ``ratios`` {B: (measured_regret, fitted_regret)}, ``unbracketed``
    {B: reason}."""
    ratios = ratios or {32: (1.05, 1.0), 64: (1.0, 1.0), 128: (1.08, 1.1)}
    unbracketed = unbracketed or {}
    entries = [{"batch_size": b, "step_s": 1e-3, "steps": 100.0, "measured_steps": 100.0, "regret": m,
                "measured_regret": m, "fitted_regret": f, "unbracketed_reason": unbracketed.get(b)}
               for b, (m, f) in ratios.items()]
    entries.append({"batch_size": 4, "step_s": 1e-3, "steps": None, "measured_regret": None, "fitted_regret": None,
                    "never_reached": ["budget"]})
    return {"quick": False, "recommended_batch_size": rec, "within_10_percent": list(band),
            "quick_recommended_batch_size": quick_b, "quick_regret": 9.9,  # regret[B] wins over it
            "regret": {str(b): m for b, (m, f) in ratios.items()}, "batch_sizes": entries,
            "unbracketed": sorted(unbracketed), "lr_at_edge": [],
            "cost": {"samples": samples, "steps": 9000, "wall_s": 30.0, "trials": 40, "fits": 50}}


def write_seed(root, seed, summary, quick_b=None, results_csv=None):
    full, quick = root / f"seed{seed}" / "full", root / f"seed{seed}" / "quick"
    full.mkdir(parents=True)
    (full / "summary.json").write_text(json.dumps(summary))
    if results_csv:
        (full / "results.csv").write_text(results_csv)
    if quick_b is not None:
        quick.mkdir()
        (quick / "quick.json").write_text(json.dumps({"quick": True, "quick_recommended_batch_size": quick_b}))


def summarise(sq, root, capsys):
    rc = sq.main(["--out", str(root), "--from-folders", "--json", str(root / "q.json")])
    data = json.loads((root / "q.json").read_text())
    return rc, data, {g["key"]: g["passed"] for g in data["goals"]}, \
        capsys.readouterr().out


def test_three_agreeing_seeds_pass_every_goal(sq, tmp_path, capsys):
    for seed in range(3):
        write_seed(tmp_path, seed, new_summary(), quick_b=64)
    (tmp_path / "runs.json").write_text(json.dumps({f"seed{s}/full": {"wall_s": 45.0} for s in range(3)}))
    rc, data, goals, out = summarise(sq, tmp_path, capsys)
    assert rc == 0 and data["all_passed"] and all(goals.values())
    row = data["rows"][0]
    assert row["format"] == "new" and row["outside_bands_of"] == [] and row["quick_regret"] == 1.0
    assert row["worst_ratio"] == pytest.approx(1.05) and row["worst_ratio_b"] == 32
    assert "5/5 passed" in out and "seed 2" in out


def test_a_recommendation_outside_another_seeds_band_fails_the_cross_check(sq, tmp_path, capsys):
    write_seed(tmp_path, 0, new_summary(rec=64, band=(64,)), quick_b=64)
    write_seed(tmp_path, 1, new_summary(rec=64, band=(32, 64, 128)), quick_b=64)
    write_seed(tmp_path, 2, new_summary(rec=128, band=(64, 128)), quick_b=64)
    rc, data, goals, out = summarise(sq, tmp_path, capsys)
    assert [r["outside_bands_of"] for r in data["rows"]] == [[], [], [0]]
    assert rc == 1 and not goals["bands"]
    assert "no: [0]" in out


def test_the_worst_regret_ratio_and_the_quick_regret_decide_their_goals(sq, tmp_path, capsys):
    write_seed(tmp_path, 0, new_summary(), quick_b=128)  # regret[128] = 1.08
    write_seed(tmp_path, 1, new_summary(ratios={32: (2.5, 1.2), 64: (1.0, 1.0), 128: (1.3, 1.1)}), quick_b=128)
    write_seed(tmp_path, 2, new_summary(), quick_b=None)  # no quick run: the full study's own quick B
    rc, data, goals, out = summarise(sq, tmp_path, capsys)
    rows = data["rows"]
    assert "seed 0: the quick run chose B=128, the full study's own throughput and noise runs B=64" in out
    assert rows[1]["worst_ratio"] == pytest.approx(2.5 / 1.2) and rows[1]["worst_ratio_b"] == 32
    assert not goals["ratio"]
    assert [r["quick_regret"] for r in rows] == [1.08, 1.3, 1.0]
    assert not goals["quick"]  # seed 1: 1.3


def test_unbracketed_best_lrs_pass_only_where_a_cap_explains_them(sq, tmp_path, capsys):
    write_seed(tmp_path, 0, new_summary(unbracketed={128: "cap: --lr_extend 3 more LRs tried upward"}), quick_b=64)
    write_seed(tmp_path, 1, new_summary(), quick_b=64)
    write_seed(tmp_path, 2, new_summary(), quick_b=64)
    _, data, goals, out = summarise(sq, tmp_path, capsys)
    assert data["rows"][0]["unbracketed"] == {"128": "cap: --lr_extend 3 more LRs tried upward"}
    assert goals["unbracketed"] and "1: [128]" in out
    summary = new_summary(unbracketed={32: "slow: LRs up of the best were stopped for time", 128: "cap: x"})
    (tmp_path / "seed1" / "full" / "summary.json").write_text(json.dumps(summary))
    _, data, goals, out = summarise(sq, tmp_path, capsys)
    assert not goals["unbracketed"] and "2: [32, 128]" in out and "seeds 1" in out


def test_cost_goal_fails_on_samples_or_on_a_wall_above_the_baselines_run_beside_it(sq, tmp_path, capsys):
    for seed in range(3):
        write_seed(tmp_path, seed, new_summary(samples=30e6 if seed == 2 else 20e6), quick_b=64)
    _, _, goals, _ = summarise(sq, tmp_path, capsys)
    assert not goals["cost"]
    (tmp_path / "seed2" / "full" / "summary.json").write_text(json.dumps(new_summary()))
    runs = {f"seed{s}/full": {"wall_s": 90.0} for s in range(3)}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    _, _, goals, text = summarise(sq, tmp_path, capsys)
    assert goals["cost"] and "wall not judged" in text  # no baseline: a slow machine is not the study's fault
    runs.update({f"seed{s}/baseline": {"wall_s": 100.0} for s in range(3)})
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    _, _, goals, text = summarise(sq, tmp_path, capsys)
    assert goals["cost"] and "baseline wall s" in text
    runs["seed1/baseline"]["wall_s"] = 80.0
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    _, _, goals, _ = summarise(sq, tmp_path, capsys)
    assert not goals["cost"]


OLD_CSV = ("batch_size,lr,lr_factor,status,steps,samples,seconds_to_target,steps_run,max_steps,wall_s,best_value,"
           "final_value\n8,0.001,1,reached,100,800,0.1,100,2000,1.5,1.0,1.0\n"
           "64,0.002,1,reached,40,2560,0.05,40,2000,0.5,1.0,1.0\n64,0.004,2,budget,,,,2000,2000,9.0,1.2,1.2\n")


def test_the_old_format_computes_its_ratio_and_cost_and_counts_lr_at_edge(sq, tmp_path, capsys):
    old = {"quick": False, "recommended_batch_size": 64, "within_10_percent": [64], "quick_recommended_batch_size": 8,
           "quick_regret": 2.5, "regret": {"8": 2.5, "64": 1.0}, "lr_at_edge": [8], "s_min": 20.0, "b_crit": 16.0,
           "batch_sizes": [{"batch_size": 8, "step_s": 1e-3, "steps": 100, "regret": 2.5, "lr_at_edge": "up"},
                           {"batch_size": 64, "step_s": 1e-3, "steps": 40, "regret": 1.0, "lr_at_edge": None},
                           {"batch_size": 512, "step_s": 2e-3, "steps": None, "regret": None}]}
    for seed in range(3):
        write_seed(tmp_path, seed, old, quick_b=8, results_csv=OLD_CSV)
    _, data, goals, out = summarise(sq, tmp_path, capsys)
    row = data["rows"][0]
    # measured regret 100/40 = 2.5; fitted 20 (1 + 16/8) / 40 = 1.5: ratio 5/3 at B=8; at 64, 40 / 25 = 1.6.
    assert row["format"] == "old" and row["worst_ratio"] == pytest.approx(2.5 / 1.5) and row["worst_ratio_b"] == 8
    assert list(row["unbracketed"]) == ["8"] and row["unbracketed"]["8"].startswith("cap")
    assert (row["trials"], row["steps"], row["samples"], row["wall_s"]) == (3, 2140, 800 + 2560 + 128000, 11.0)
    assert row["quick_regret"] == 2.5 and goals["bands"] and goals["ratio"] and not goals["quick"]
    assert "results.csv (trial fits only)" in out


def test_missing_folders_fail_every_goal_without_a_traceback(sq, tmp_path, capsys):
    rc, data, goals, _ = summarise(sq, tmp_path, capsys)
    assert rc == 1 and not any(goals.values()) and data["rows"][0]["format"] == "missing"


FAKE_PYTHON = """#!{python}
import json, sys
from pathlib import Path
args = sys.argv[1:]
if args[0] == "-c":
    print("/fake/batchlab/__init__.py")
    sys.exit()
out, seed = Path(args[args.index("--out") + 1]), int(args[args.index("--seed_everything") + 1])
out.mkdir(parents=True)
name = "quick.json" if "--quick" in args else "summary.json"
(out / name).write_text(json.dumps({{"quick_recommended_batch_size": 64, "recommended_batch_size": 64,
                                    "within_10_percent": [64], "regret": {{"64": 1.0}}, "seed": seed,
                                    "extra": args[args.index("study") + 1:]}}))
print("ran", args)
"""


def test_runs_one_subprocess_per_study_into_its_own_folder_and_refuses_existing_ones(sq, tmp_path, capsys):
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "q"
    sq.main(["--out", str(out), "--python", str(python), "--seeds", "0", "3", "--", "--grid", "[4,16]"])
    runs = json.loads((out / "runs.json").read_text())
    assert runs["code"] == "/fake/batchlab/__init__.py"
    assert sorted(k for k in runs if k.startswith("seed")) == ["seed0/full", "seed0/quick", "seed3/full", "seed3/quick"]
    assert all(runs[k]["rc"] == 0 and runs[k]["wall_s"] > 0 for k in runs if k.startswith("seed"))
    full = json.loads((out / "seed3" / "full" / "summary.json").read_text())
    assert full["seed"] == 3 and full["extra"][-2:] == ["--grid", "[4,16]"] and "--quick" not in full["extra"]
    assert "--quick" in json.loads((out / "seed3" / "quick" / "quick.json").read_text())["extra"]
    assert "ran" in (out / "seed0" / "quick.log").read_text()
    assert "seed 3" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a study would resume from the folder, and time nothing
        sq.main(["--out", str(out), "--python", str(python), "--seeds", "0"])
    assert "exist" in capsys.readouterr().err
