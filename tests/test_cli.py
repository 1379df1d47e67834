"""The ``batchlab`` command end to end: the seed run, its summary and TensorBoard logs, parity with the
notebook's own loop, predict/validate/test, and one-line errors for bad input (the full table of bad input, for
every command, is in test_bad_input.py)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import DEVICES, QUIET, SEED, STUDY, command_env, hparams_plugin, load_summary, run_dirs, scalars

from batchlab import notebook
from batchlab.data import ToyRegressionData

SUMMARY_KEYS = {
    "batch_size", "global_batch_size", "epochs", "steps", "train_loss", "wall_s", "samples_per_s", "device",
    "predictions", "log_dir",
}


def test_seed_run_prints_a_summary_writes_summary_json_and_predicts_about_21(batchlab, tmp_path):
    result = batchlab("fit", "-c", SEED, *QUIET)
    assert result.code == 0, result.err
    (log_dir,) = run_dirs(tmp_path)
    summary = load_summary(log_dir)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["batch_size"] == 2 and summary["global_batch_size"] == 2
    assert summary["epochs"] == 50 and summary["steps"] == 100 and summary["samples_seen"] == 200
    assert summary["device"] == "cpu"
    assert summary["wall_s"] > 0 and summary["samples_per_s"] == pytest.approx(200 / summary["wall_s"])
    assert summary["predictions"]["x"] == [[10.0, 11.0]]
    (prediction,) = summary["predictions"]["y"][0]
    assert abs(prediction - 21) < 1.5
    assert summary["log_dir"] == str(log_dir.relative_to(tmp_path))
    assert (log_dir / "config.yaml").is_file() and (log_dir / "hparams.yaml").is_file()
    assert list((log_dir / "checkpoints").glob("*.ckpt"))
    for text in ("batchlab fit summary", "2 per device, 2 global", "50 epochs, 100 steps", "[10, 11] ->", "samples/s"):
        assert text in result.out


def test_tensorboard_has_per_step_loss_loss_by_samples_seen_and_hparams_against_real_metrics(batchlab, tmp_path):
    assert batchlab("fit", "-c", SEED, *QUIET).code == 0
    (log_dir,) = run_dirs(tmp_path)
    summary = load_summary(log_dir)
    tags = scalars(log_dir)
    assert len(tags["train/loss"]) == 100
    by_samples = tags["train/loss_vs_samples"]
    assert [step for step, _ in by_samples] == list(range(2, 201, 2))
    assert [v for _, v in by_samples] == [v for _, v in tags["train/loss"]]
    assert tags["hp/train_loss"][-1][1] == pytest.approx(summary["train_loss"])
    params, metric_tags = hparams_plugin(log_dir)
    assert params["batch_size"] == 2 and params["lr"] == pytest.approx(0.001)
    assert params["global_batch_size"] == 2 and params["hidden_sizes"] == "[8]"
    assert "hp/train_loss" in metric_tags and "hp_metric" not in tags


def test_validation_metrics_are_logged_every_epoch_and_reported(batchlab, tmp_path):
    result = batchlab(
        "fit", "-c", SEED, *QUIET, "--data.n_samples", "200", "--data.noise", "0.5", "--data.val_fraction", "0.25",
        "--data.batch_size", "16", "--trainer.max_epochs", "5",
    )
    assert result.code == 0, result.err
    (log_dir,) = run_dirs(tmp_path)
    tags = scalars(log_dir)
    for tag in ("val/loss", "val/mae", "val/r2"):
        assert len(tags[tag]) == 5, tag
    summary = load_summary(log_dir)
    assert summary["metrics"]["val/loss"] == pytest.approx(tags["val/loss"][-1][1])
    assert summary["steps"] == 5 * math.ceil(150 / 16)
    _, metric_tags = hparams_plugin(log_dir)
    assert "hp/val_loss" in metric_tags
    assert "val/loss" in result.out


def _batchlab_losses(batchlab, tmp_path, seed, *args):
    result = batchlab("fit", "-c", SEED, *QUIET, "--seed_everything", str(seed), *args)
    assert result.code == 0, result.err
    log_dir = run_dirs(tmp_path)[-1]
    return [v for _, v in scalars(log_dir)["train/loss"]], load_summary(log_dir)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_with_the_notebooks_loop_on_its_data(batchlab, tmp_path, seed):
    net, losses, _ = notebook.train(seed=seed)
    ours, summary = _batchlab_losses(batchlab, tmp_path, seed)
    assert len(ours) == len(losses) == 100
    assert max(abs(a - b) for a, b in zip(ours, losses)) < 1e-5
    expected = net(torch.tensor([[10.0, 11.0]])).item()
    assert summary["predictions"]["y"][0][0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("seed", [pytest.param(s, marks=pytest.mark.slow) for s in (0, 1, 2)])
def test_parity_with_the_notebooks_loop_on_1000_synthetic_samples_at_batch_32(batchlab, tmp_path, seed):
    x, y = ToyRegressionData(n_samples=1000, noise=1.0).full_data()
    net, losses, _ = notebook.train(x, y, batch_size=32, epochs=50, seed=seed)
    ours, summary = _batchlab_losses(
        batchlab, tmp_path, seed, "--data.n_samples", "1000", "--data.noise", "1.0", "--data.batch_size", "32"
    )
    assert len(ours) == len(losses) == 50 * 32
    assert max(abs(a - b) for a, b in zip(ours, losses)) < 1e-5
    expected = net(torch.tensor([[10.0, 11.0]])).item()
    assert summary["predictions"]["y"][0][0] == pytest.approx(expected, abs=1e-5)


def test_predict_prints_predictions_for_predict_x_from_a_checkpoint(batchlab, tmp_path):
    assert batchlab("fit", "-c", SEED, *QUIET).code == 0
    (log_dir,) = run_dirs(tmp_path)
    summary = load_summary(log_dir)
    (ckpt,) = (log_dir / "checkpoints").glob("*.ckpt")
    result = batchlab("predict", "-c", SEED, *QUIET, "--ckpt_path", str(ckpt), "--data.predict_x", "[[10,11],[1,1]]")
    assert result.code == 0, result.err
    lines = [line for line in result.out.splitlines() if "->" in line]
    assert len(lines) == 2
    assert lines[0].startswith("[10, 11] -> [") and lines[1].startswith("[1, 1] -> [")
    predicted = float(lines[0].split("[")[2].rstrip("]"))
    assert predicted == pytest.approx(summary["predictions"]["y"][0][0], abs=1e-4)
    assert run_dirs(tmp_path) == [log_dir], "a prediction makes no run folder of its own"


def test_validate_and_test_report_metrics_of_a_checkpoint(batchlab, tmp_path):
    split = ["--data.n_samples", "200", "--data.val_fraction", "0.2", "--data.test_fraction", "0.2",
             "--data.batch_size", "16", "--trainer.max_epochs", "2"]
    assert batchlab("fit", "-c", SEED, *QUIET, *split).code == 0
    (ckpt,) = (run_dirs(tmp_path)[0] / "checkpoints").glob("*.ckpt")
    result = batchlab("test", "-c", SEED, *QUIET, *split, "--ckpt_path", str(ckpt))
    assert result.code == 0, result.err
    assert "test/loss" in result.out and "test/r2" in result.out
    result = batchlab("validate", "-c", SEED, *QUIET, *split, "--ckpt_path", str(ckpt))
    assert result.code == 0, result.err
    assert "val/mae" in result.out


def test_a_second_run_gets_its_own_folder_and_leaves_the_first_untouched(batchlab, tmp_path):
    assert batchlab("fit", "-c", SEED, *QUIET).code == 0
    (first,) = run_dirs(tmp_path)
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert batchlab("fit", "-c", SEED, *QUIET, "--data.batch_size", "4").code == 0
    first_again, second = run_dirs(tmp_path)
    assert first_again == first and {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    assert load_summary(second)["batch_size"] == 4


def test_a_batch_larger_than_the_data_trains_one_batch_per_epoch(batchlab, tmp_path):
    result = batchlab("fit", "-c", SEED, *QUIET, "--data.batch_size", "8", "--trainer.max_epochs", "3")
    assert result.code == 0, result.err
    summary = load_summary(run_dirs(tmp_path)[0])
    assert summary["steps"] == 3 and summary["samples_seen"] == 12


def test_with_drop_last_a_batch_of_the_whole_split_trains_and_the_finder_still_stops_at_the_data(batchlab, tmp_path):
    result = batchlab("fit", "-c", SEED, *QUIET, "--data.batch_size", "4", "--data.drop_last", "true",
                      "--trainer.max_epochs", "3")
    assert result.code == 0, result.err
    assert load_summary(run_dirs(tmp_path)[0])["steps"] == 3
    # The finder's trials go past the data (3, then 6 of 4 samples): the refusal must not be in their way.
    result = batchlab("tune", "-c", SEED, *QUIET, "--data.drop_last", "true", "--init_val", "3")
    assert result.code == 0, result.err
    assert "stopped because    dataset_size" in result.out
    # ... and with drop_last its batch of 6 held no batch: the size found is the largest that trained, 3, not 6.
    assert "batch size found   3 " in result.out and "which drop_last leaves without a batch; 3" in result.out
    tune = json.loads(next(tmp_path.rglob("tune.json")).read_text())
    assert tune["batch_size"] == tune["effective_batch_size"] == 3 and tune["untried_corrected_from"] == 6
    assert tune["largest_ok"] == 3
    assert tune["trials"][-1] == {"batch_size": 6, "ok": True, "steps": 0, "peak_memory_bytes": None}
    assert "6 ran no batch (drop_last)" in result.out and "the largest batch tried was 3" in result.out


@pytest.mark.parametrize("device", DEVICES)
def test_fit_runs_on_each_available_device(batchlab, tmp_path, device):
    result = batchlab("fit", "-c", SEED, *QUIET, "--trainer.accelerator", device, "--trainer.max_epochs", "5")
    assert result.code == 0, result.err
    summary = load_summary(run_dirs(tmp_path)[0])
    assert summary["device"].startswith("cuda" if device == "gpu" else "cpu")
    assert summary["steps"] == 10 and math.isfinite(summary["train_loss"])


BAD_INPUT = [
    (["--data.batch_size", "0"], "batch_size=0"),
    (["--data.batch_size", "-3"], "batch_size=-3"),
    (["--data.batch_size", "abc"], "data.batch_size='abc'"),
    (["--data.batch_size", "1.5"], "data.batch_size=1.5 is not allowed: use a positive integer"),
    # As typed, not as jsonargparse parsed them (1000.0, True).
    (["--data.batch_size", "1e3"], "data.batch_size='1e3' is not allowed: use a positive integer"),
    (["--data.init_args.batch_size=true"], "data.batch_size='true' is not allowed: use a positive integer"),
    (["--data.n_samples", "0"], "n_samples=0"),
    (["--data.noise", "-1"], "data.noise=-1 is not allowed: use a finite number >= 0"),
    (["--data.val_fraction", "1.5"], "val_fraction=1.5"),
    (["--data.predict_x", "[[1,2,3]]"], "has 3 values"),
    (["--data.no_such_key", "1"], "data.no_such_key is not an option of batchlab.data.ToyRegressionData"),
    (["--data.n_samples", "x"], "data.n_samples='x' is not allowed: use a positive integer or null"),
    (["--model.class_path", "nope.Model"], "model.class_path='nope.Model'"),
    (["--model.optimizer", "foo"], "model.optimizer='foo'"),
    (["--model.lr", "-1"], "model.lr=-1 is not allowed: use a finite number > 0"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_is_a_one_line_error_with_exit_2(batchlab, args, message):
    result = batchlab("fit", "-c", SEED, *QUIET, *args)
    assert result.code == 2
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert lines[-1].startswith("batchlab: error: ") and message in lines[-1]
    assert "Traceback" not in result.err + result.out


def test_a_config_given_inline_rather_than_as_a_file_is_still_read(batchlab, tmp_path):
    result = batchlab("fit", "-c", SEED, *QUIET, "-c", '{"trainer": {"max_epochs": 1}}')
    assert result.code == 0, result.err
    assert load_summary(run_dirs(tmp_path)[0])["epochs"] == 1


def test_an_inline_config_longer_than_a_file_name_is_read_as_a_config(batchlab):
    # As a path it would be too long for the file system (more than 255 bytes), which once ended in a traceback.
    inline = json.dumps({"trainer": {"max_epochs": 3, "default_root_dir": "x" * 300}})
    result = batchlab("fit", "-c", SEED, "-c", inline, "--print_config")
    assert result.code == 0, result.err[-2000:]
    assert "max_epochs: 3" in result.out


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "batchlab.cli", "fit", "-c", SEED, "--data.batch_size", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    # The one line alone: Lightning's "Seed set to 0", logged before the data is built, is not shown.
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("batchlab: error: data.batch_size=0 is not allowed")


# In a subprocess: under pytest, Lightning's loggers write to pytest's handlers, not to the terminal. One process
# runs the three commands in turn (imports cost more than the runs), each section opened by a marker on both streams.
_IN_TURN = """
import sys
from batchlab.cli import main
for args in {runs!r}:
    for stream in (sys.stdout, sys.stderr):
        print("=== " + args[0], file=stream, flush=True)
    try:
        main(args)
        code = 0
    except SystemExit as stop:
        code = stop.code
    print(f"exit {{code}}", file=sys.stderr, flush=True)
"""


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for block in text.split("=== ")[1:]:
        name, _, rest = block.partition("\n")
        out[name] = [line for line in rest.splitlines() if line.strip()]
    return out


# slow: the default suite must stay under 5 minutes on 2 cores; the others cover this path there too.
@pytest.mark.slow
def test_bad_input_prints_its_error_line_alone_and_a_run_that_starts_shows_lightnings_start_up_lines(tmp_path):
    runs = [
        # Checked once the Trainer is built, after Lightning has said which devices it found and warned about the
        # precision (a fit's bad input: test_the_installed_command_exits_2_without_a_traceback).
        ["tune", "-c", SEED, "--trainer.precision", "16", "--max_val", "0"],
        ["study", "-c", STUDY, "--grid", "[100000]"],
        ["fit", "-c", SEED, *QUIET, "--trainer.max_epochs", "1"],
    ]
    proc = subprocess.run([sys.executable, "-c", _IN_TURN.format(runs=runs)], cwd=tmp_path, env=command_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, err = _sections(proc.stdout), _sections(proc.stderr)
    for name, message in (("tune", "max_val=0 is not allowed"), ("study", "grid entries [100000] are above the cap")):
        lines = out[name] + err[name]
        assert lines[-1] == "exit 2" and len(lines) == 2, lines
        assert lines[0].startswith("batchlab: error: ") and message in lines[0], lines
    lines = err["fit"]
    assert lines[-1] == "exit 0", lines
    seed = lines.index("Seed set to 0")
    devices = next(i for i, line in enumerate(lines) if line.startswith("GPU available: "))
    stopped = next(i for i, line in enumerate(lines) if line.startswith("`Trainer.fit` stopped"))
    assert seed < devices < stopped, lines


def test_held_start_up_warnings_are_all_shown_even_when_a_catch_warnings_block_outlives_the_hold():
    import warnings

    from batchlab.quiet import StartupLines

    lines = StartupLines()
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda *args: shown.append(str(args[0]))
        lines.hold()
        warnings.warn("held", UserWarning)
        with warnings.catch_warnings():  # saves the holding hook, and puts it back after show()
            lines.show()
        warnings.warn("after", UserWarning)
    assert shown == ["held", "after"] and not lines.held
