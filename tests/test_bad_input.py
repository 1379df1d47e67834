"""Bad input to every command (fit, validate, test, predict, tune) and runs that would write over an earlier one.

Each case must end in one line, ``batchlab: error: ...``, that names the value and what is allowed, with exit
status 2, no traceback, and nothing written: an earlier run's folder, copied into the working directory first,
stays byte-identical and no new file or folder appears anywhere.
"""

import os
import shutil
import zipfile

import pytest
import torch
from conftest import CONFIGS, QUIET, SEED, run_command, run_dirs, snapshot

FIT_ONCE = ["--trainer.max_epochs", "2"]
CKPT = "runs/seed/version_0/checkpoints/epoch=1-step=4.ckpt"  # what FIT_ONCE leaves on the seed data


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A finished fit's working directory (``runs/seed/version_0``), made once and copied into each test."""
    root = tmp_path_factory.mktemp("earlier")
    proc = run_command(root, "fit", "-c", SEED, *QUIET, *FIT_ONCE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (root / CKPT).is_file()
    return root


@pytest.fixture
def workdir(earlier, tmp_path):
    """``tmp_path`` holding the earlier run, plus the bad files the cases name."""
    shutil.copytree(earlier / "runs", tmp_path / "runs")
    (tmp_path / "afile").write_text("a file where a folder should be\n")
    (tmp_path / "broken.yaml").write_text("data: [1\n")
    (tmp_path / "unknown.yaml").write_text("data:\n  no_such_key: 1\n")
    (tmp_path / "nan.yaml").write_text("data:\n  noise: .nan\n")
    (tmp_path / "typed.yaml").write_text("data:\n  batch_size: many\n")
    (tmp_path / "broken.ckpt").write_text("not a checkpoint\n")
    _bad_checkpoints(tmp_path)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    yield tmp_path
    readonly.chmod(0o755)


def _bad_checkpoints(root):
    """What a newcomer might pass as a checkpoint: a zip torch did not write, a bare state_dict, a whole pickled
    module, and, to resume a fit, the earlier run's checkpoint less all but its weights."""
    with zipfile.ZipFile(root / "archive.zip", "w") as archive:
        archive.writestr("notes.txt", "a zip, but not one torch wrote")
    torch.save({"net.0.weight": torch.zeros(8, 2), "net.0.bias": torch.zeros(8)}, root / "weights.pt")
    torch.save(torch.nn.Linear(2, 1), root / "module.pt")
    full = torch.load(root / CKPT, weights_only=True)
    torch.save({k: v for k, v in full.items() if k not in ("optimizer_states", "loops", "callbacks", "lr_schedulers")},
               root / "weights-only.ckpt")


READONLY = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders"
)

# Every command: (arguments after the command, a fragment the error line must hold).
EVERY_COMMAND = [
    (["--data.batch_size", "0"], "batch_size=0 is not allowed: use a positive integer"),
    (["--data.batch_size", "abc"], "data.batch_size='abc' is not allowed: use a positive integer"),
    (["--data.val_fraction", "1.5"], "val_fraction=1.5 is not allowed: use a number in [0, 1)"),
    (["--data.no_such_key", "1"], "no_such_key"),
    (["-c", "unknown.yaml"], "no_such_key"),
    (["-c", "missing.yaml"],
     "config='missing.yaml' is not allowed: there is no such file; pass the path of a YAML file "
     "(e.g. configs/seed.yaml)"),
    (["--config=runs"], "config='runs' is not allowed: it is a folder, not a file; pass the path of a YAML file"),
    (["-c", "broken.yaml"], "config='broken.yaml' is not allowed: it is not valid YAML at line 2"),
    (["-c", "typed.yaml"], "data.batch_size='many' is not allowed: use a positive integer"),
    (["-c", "nan.yaml"], "noise=nan is not allowed: use a finite number >= 0"),
    (["--data.noise", "nan"], "data.noise=nan is not allowed: use a finite number >= 0"),
    (["--data.x_range", "[0, inf]"], "data.x_range=inf is not allowed: use a finite number"),
    (["--data.predict_x", "[[nan, 1]]"], "data.predict_x=nan is not allowed: use a finite number"),
    (["--model.lr", "inf"], "model.lr=inf is not allowed: use a finite number > 0"),
    (["--trainer.logger.init_args.save_dir", "afile/logs"],
     "save_dir='afile/logs' is not allowed: afile is a file, not a folder; use a folder you can write to"),
    (["--trainer.logger", "false", "--trainer.default_root_dir", "afile/out"],
     "default_root_dir='afile/out' is not allowed: afile is a file, not a folder"),
    (["--trainer.logger.init_args.version", "0"],
     "version=0 is not allowed: runs/seed/version_0 already holds a run"),
    (["--trainer.accelerator", "foo"], "accelerator='foo'"),
]

ONE_COMMAND = [
    # A switch given a value that is not a boolean: the parser's one line, not "unrecognized arguments".
    ("fit", ["--verbose", "maybe"], "verbose='maybe' is not allowed: use true or false"),
    # The checkpoints' folder for one of its files: refused before anything is written, naming what it holds.
    ("fit", ["--ckpt_path", "runs/seed/version_0/checkpoints"],
     "it is a folder, not a checkpoint (it holds epoch=1-step=4.ckpt)"),
    ("predict", ["--ckpt_path", "runs/seed/version_0/checkpoints"], "it is a folder, not a checkpoint"),
    # A batch-size attribute that nothing holds: refused before the search's fit writes a run folder.
    ("tune", ["--batch_arg_name", "nope"], "batch_arg_name='nope' is not allowed: neither MLPRegressor nor"),
    ("fit", ["-c", str(CONFIGS / "find_batch_size.yaml"), "--trainer.callbacks.init_args.batch_arg_name", "nope"],
     "batch_arg_name='nope' is not allowed"),
    ("fit", ["--ckpt_path", "missing.ckpt"], "ckpt_path='missing.ckpt' is not allowed: there is no such file"),
    ("fit", ["--ckpt_path", "broken.ckpt"], "ckpt_path='broken.ckpt' is not allowed: it is not a checkpoint"),
    ("validate", ["--ckpt_path", "missing.ckpt"], "ckpt_path='missing.ckpt' is not allowed: there is no such file"),
    ("test", ["--ckpt_path", "broken.ckpt"], "ckpt_path='broken.ckpt' is not allowed: it is not a checkpoint"),
    ("predict", ["--ckpt_path", "missing.ckpt"], "ckpt_path='missing.ckpt' is not allowed: there is no such file"),
    ("predict", ["--ckpt_path", "broken.ckpt"], "ckpt_path='broken.ckpt' is not allowed: it is not a checkpoint"),
    ("predict", ["--ckpt_path", CKPT, "--data.predict_x", "[[1, 2, 3]]"], "has 3 values"),
    *[(command, ["--ckpt_path", path], f"ckpt_path={path!r} is not allowed: {problem}; give the path of a "
                                       "checkpoint a fit saved (runs/NAME/version_N/checkpoints/*.ckpt)")
      for command in ("fit", "validate", "test", "predict")
      for path, problem in [
          ("archive.zip", "it is a zip archive that torch.save did not write (no data.pkl in it)"),
          ("weights.pt", "it is a torch file but not a Lightning checkpoint (no 'pytorch-lightning_version' or "
                         "'state_dict'; its keys are 'net.0.weight', 'net.0.bias')"),
          ("module.pt", "it holds pickled objects (torch.nn.modules.linear.Linear) that torch's weights-only "
                        "loader refuses, and LightningCLI reads a checkpoint with it"),
      ]],
    ("fit", ["--ckpt_path", "weights-only.ckpt"],
     "ckpt_path='weights-only.ckpt' is not allowed: it holds the weights alone (ModelCheckpoint's save_weights_only), "
     "and a fit resumes from a full checkpoint; give one saved without save_weights_only, or leave out --ckpt_path"),
    ("fit", ["--trainer.max_epochs", "1.5"], "trainer.max_epochs=1.5 is not allowed: use an integer"),
    ("fit", ["--trainer.max_epochs", "-5"], "max_epochs` must be a non-negative integer or -1"),
    ("fit", ["--trainer.accumulate_grad_batches", "0"], "accumulate_grad_batches=0 is not allowed"),
    ("fit", ["--trainer.log_every_n_steps", "0"], "log_every_n_steps=0 is not allowed"),
    ("fit", ["--trainer.check_val_every_n_epoch", "0"], "check_val_every_n_epoch=0 is not allowed"),
    ("fit", ["--trainer.gradient_clip_val", "-1"], "gradient_clip_val=-1 is not allowed: use a finite number >= 0"),
    ("fit", ["--trainer.strategy", "foo"], "strategy='foo'"),
    ("fit", ["--trainer.num_nodes", "0"], "num_nodes` must be a positive integer, but got 0"),
    ("fit", ["--seed_everything", "abc"], "seed_everything='abc' is not allowed"),
    ("fit", ["--model.hidden_sizes", "[0]"], "model.hidden_sizes=0 is not allowed: use a positive integer"),
    ("fit", ["--model.optimizer", "foo"], "model.optimizer='foo' is not allowed: use one of 'sgd', 'adam'"),
    ("tune", ["--max_val", "0"], "max_val=0 is not allowed: use a positive integer"),
    ("tune", ["--mode", "foo"], "mode='foo' is not allowed"),
    ("tune", ["--init_val", "abc"], "init_val='abc' is not allowed: use a positive integer"),
    ("tune", ["--max_trials", "-1"], "max_trials=-1 is not allowed: use an integer >= 0"),
    ("tune", ["--steps_per_trial", "0"], "steps_per_trial=0 is not allowed: use a positive integer"),
    ("tune", ["--init_val", "64", "--max_val", "8"], "init_val=64 is not below max_val=8"),
    # Lightning would train nothing, say "No training batches" and exit 0.
    ("fit", ["--data.batch_size", "10", "--data.drop_last", "true"],
     "batch_size=10 with drop_last=true leaves no training batch: the training split has 4 samples; "
     "use batch_size <= 4, or drop_last false"),
    ("tune", ["--data.batch_size", "5", "--data.drop_last", "true"],
     "batch_size=5 with drop_last=true leaves no training batch"),
    # The noise-scale monitor and the batch-size warmup (docs/callbacks.md).
    ("fit", ["-c", str(CONFIGS / "noise_scale.yaml"), "--trainer.callbacks.init_args.every_n_steps", "0"],
     "every_n_steps=0 is not allowed: use a positive integer"),
    ("fit", ["-c", str(CONFIGS / "noise_scale.yaml"), "--trainer.callbacks.init_args.preconditioned", "true"],
     "NoiseScaleMonitor preconditioned=true needs an Adam-family optimizer"),
    ("fit", ["-c", str(CONFIGS / "noise_scale.yaml"), "--trainer.callbacks.init_args.estimator", "ranks"],
     "NoiseScaleMonitor estimator=ranks needs DDP on 2 or more devices"),
    ("fit", ["-c", str(CONFIGS / "batch_size_warmup.yaml"), "--trainer.callbacks.init_args.factor", "1"],
     "BatchSizeWarmup factor=1: the batch must grow, use an integer factor >= 2"),
    ("fit", ["-c", str(CONFIGS / "batch_size_warmup.yaml"), "--trainer.callbacks.init_args.max_batch_size", "1"],
     "BatchSizeWarmup max_batch_size=1 is below the starting global batch 2"),
    ("fit", ["--trainer.callbacks+", "batchlab.callbacks.BatchSizeWarmup"],
     "BatchSizeWarmup without a schedule follows the noise scale"),
    ("test", [], "there is no test split: set --data.test_fraction above 0 (e.g. 0.2)"),
    ("validate", [], "there is no validation split: set --data.val_fraction above 0 (e.g. 0.2)"),
]

# validate, test and predict also load the earlier run's checkpoint, as they would in use.
COMMANDS = {"fit": [], "validate": ["--ckpt_path", CKPT], "test": ["--ckpt_path", CKPT],
            "predict": ["--ckpt_path", CKPT], "tune": []}
READONLY_CASE = (["--trainer.logger.init_args.save_dir", "readonly/logs"],
                 "save_dir='readonly/logs' is not allowed: readonly is not writable; use a folder you can write to")


def _case(command, args, message, marks=()):
    return pytest.param(command, COMMANDS[command] + args, message, marks=marks, id=f"{command} {' '.join(args)}")


CASES = (
    [_case(command, args, message) for command in COMMANDS for args, message in EVERY_COMMAND]
    + [_case(command, *READONLY_CASE, marks=READONLY) for command in COMMANDS]
    + [pytest.param(*case, id=f"{case[0]} {' '.join(case[1])}") for case in ONE_COMMAND]
)


@pytest.mark.parametrize(("command", "args", "message"), CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(batchlab, workdir, command, args, message):
    before = snapshot(workdir)
    result = batchlab(command, "-c", SEED, *QUIET, *args)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 2, result.err[-2000:]
    assert lines and lines[-1].startswith("batchlab: error: "), result.err[-2000:]
    assert message in lines[-1]
    assert "Traceback" not in result.err + result.out
    assert snapshot(workdir) == before


def test_a_reused_version_is_refused_even_where_lightning_would_only_warn(batchlab, workdir):
    # An empty folder is free: Lightning's logger would have used it anyway.
    (workdir / "runs" / "seed" / "version_7").mkdir()
    result = batchlab("fit", "-c", SEED, *QUIET, "--trainer.max_epochs", "1", "--trainer.logger.init_args.version", "7")
    assert result.code == 0, result.err
    assert (workdir / "runs" / "seed" / "version_7" / "summary.json").is_file()
    # Once used, it is taken, for fit and for every other command that writes a run folder.
    before = snapshot(workdir)
    for command, extra in COMMANDS.items():
        result = batchlab(command, "-c", SEED, *QUIET, *extra, "--trainer.logger.init_args.version", "7")
        assert result.code == 2 and "version=7 is not allowed" in result.err.splitlines()[-1], command
    assert snapshot(workdir) == before


def test_without_a_logger_a_used_folder_is_refused_before_lightning_finds_its_config_yaml(batchlab, workdir):
    args = ["fit", "-c", SEED, *QUIET, "--trainer.max_epochs", "1", "--trainer.logger", "false",
            "--trainer.default_root_dir", "plain"]
    assert batchlab(*args).code == 0
    assert (workdir / "plain" / "config.yaml").is_file() and (workdir / "plain" / "summary.json").is_file()
    before = snapshot(workdir)
    result = batchlab(*args)
    assert result.code == 2 and "Traceback" not in result.err
    last = result.err.strip().splitlines()[-1]
    assert "default_root_dir='plain' with no logger is not allowed: plain already holds a run" in last
    assert "config.yaml" in last and "summary.json" in last
    assert snapshot(workdir) == before


def test_a_second_run_never_touches_the_first_and_a_resumed_run_gets_its_own_folder(batchlab, workdir):
    before = snapshot(workdir / "runs" / "seed" / "version_0")
    assert batchlab("fit", "-c", SEED, *QUIET, *FIT_ONCE).code == 0
    assert batchlab("fit", "-c", SEED, *QUIET, "--trainer.max_epochs", "3", "--ckpt_path", CKPT).code == 0
    assert batchlab("tune", "-c", SEED, *QUIET).code == 0
    assert [d.name for d in run_dirs(workdir)] == ["version_0", "version_1", "version_2", "version_3"]
    assert snapshot(workdir / "runs" / "seed" / "version_0") == before
