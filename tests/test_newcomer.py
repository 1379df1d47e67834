"""A newcomer's path through the command: without ``-c``, ``batchlab fit`` (validate, test, predict, tune) runs the
seed experiment and ``batchlab study`` the default study, from the configs shipped in the package (a pip-installed
batchlab needs no checkout); a class of the user's gets none of those configs' settings; a ``-c`` of the user's is
used as given; and a checkpoint's hyperparameters that replace a setting the user gave are said in one line."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml
from conftest import CONFIGS, QUIET, ROOT, SEED, STUDY, load_summary, run_dirs, scalars

NOTE = "(LightningCLI restores a checkpoint's hyperparameters)"


def _printed(batchlab, *args):
    result = batchlab(*args, "--print_config")
    assert result.code == 0, result.err[-2000:]
    return yaml.safe_load(result.out)


def test_fit_without_a_config_is_the_seed_experiment_and_predict_takes_its_checkpoint(batchlab, tmp_path):
    result = batchlab("fit", *QUIET)
    assert result.code == 0, result.err[-2000:]
    assert "50 epochs, 100 steps" in result.out and "[10, 11] -> [20.41" in result.out
    assert batchlab("fit", "-c", SEED, *QUIET).code == 0
    alone, seeded = run_dirs(tmp_path)
    assert (alone / "config.yaml").read_text() == (seeded / "config.yaml").read_text()
    losses = scalars(alone)["train/loss"]
    assert len(losses) == 100 and losses == scalars(seeded)["train/loss"]
    (prediction,) = load_summary(alone)["predictions"]["y"][0]
    assert prediction == pytest.approx(20.41, abs=0.01)
    (ckpt,) = (alone / "checkpoints").glob("*.ckpt")
    result = batchlab("predict", *QUIET, "--ckpt_path", str(ckpt))
    assert result.code == 0, result.err[-2000:]
    assert f"[10, 11] -> [{prediction:.4f}" in result.out and "note:" not in result.err


@pytest.mark.parametrize(("command", "config"), [
    ("validate", SEED), ("test", SEED), ("predict", SEED), ("tune", SEED), ("study", STUDY),
])
def test_every_command_without_a_config_takes_its_default_config(batchlab, command, config):
    assert _printed(batchlab, command) == _printed(batchlab, command, "-c", config)


@pytest.mark.parametrize(("command", "defaults"), [("fit", SEED), ("study", STUDY)])
def test_a_users_classes_without_a_config_get_none_of_the_default_configs_settings(batchlab, command, defaults):
    config = _printed(batchlab, command, "--model.class_path", "study_models.SharedNames",
                      "--data.class_path=study_models.Blobs")
    assert config["model"] == {"class_path": "study_models.SharedNames",
                               "init_args": {"dim": 4, "lr": 0.5, "hidden_sizes": [3], "momentum": 0.25}}
    assert config["data"]["init_args"]["batch_size"] == 16
    # The rest of the default config applies.
    default = yaml.safe_load(open(defaults))
    assert config["seed_everything"] == default["seed_everything"] == 0
    assert all(config["trainer"][k] == v for k, v in default["trainer"].items() if k != "logger")
    # One class of the user's: the default config's section for the other still applies.
    config = _printed(batchlab, command, "--model.class_path=study_models.SharedNames")
    assert config["data"]["init_args"]["batch_size"] == default["data"]["init_args"]["batch_size"]


def test_a_users_own_config_is_used_as_given_without_the_defaults(batchlab, tmp_path):
    (tmp_path / "mine.yaml").write_text("trainer:\n  max_epochs: 3\n")
    config = _printed(batchlab, "fit", "-c", "mine.yaml")
    assert config["trainer"]["max_epochs"] == 3
    assert config["trainer"]["logger"] is None and config["seed_everything"] is True  # Lightning's defaults
    assert config["model"]["class_path"] == "batchlab.model.MLPRegressor"  # the default classes still apply
    assert config["data"]["init_args"]["predict_x"] is None  # the seed's is [[10, 11]]


@pytest.mark.slow
def test_study_quick_without_a_config_runs_the_default_study(batchlab, tmp_path):
    result = batchlab("study", "--quick")
    assert result.code == 0, result.err[-2000:]
    assert "Recommended batch size:" in result.out
    assert (tmp_path / "studies" / "toy" / "quick.json").is_file()


def test_a_checkpoints_hyperparameters_that_replace_a_setting_given_are_said_in_one_line(batchlab, tmp_path):
    assert batchlab("fit", *QUIET, "--trainer.max_epochs", "2").code == 0
    (ckpt,) = (run_dirs(tmp_path)[0] / "checkpoints").glob("*.ckpt")
    predict = ["predict", *QUIET, "--ckpt_path", str(ckpt)]
    plain = batchlab(*predict)
    assert plain.code == 0 and "note:" not in plain.err
    result = batchlab(*predict, "--model.hidden_sizes", "[16]")
    assert result.code == 0, result.err[-2000:]
    notes = [line for line in result.err.splitlines() if line.startswith("batchlab: note:")]
    assert notes == [f"batchlab: note: --model.hidden_sizes [16] is replaced by the checkpoint's hidden_sizes=[8] "
                     f"{NOTE}"]
    assert result.out == plain.out, "it predicts with the checkpoint's model"
    # A value from the user's -c, and several at once.
    (tmp_path / "wide.yaml").write_text("model:\n  init_args:\n    hidden_sizes: [4]\n")
    result = batchlab(*predict, "-c", SEED, "-c", "wide.yaml", "--model.init_args.lr", "0.5")
    assert result.code == 0, result.err[-2000:]
    assert (f"batchlab: note: model.hidden_sizes [4] (in wide.yaml), --model.lr 0.5 are replaced by the "
            f"checkpoint's hidden_sizes=[8], lr=0.001 {NOTE}") in result.err.splitlines()
    # Nothing when they agree: configs/seed.yaml gives the values the checkpoint was trained with.
    result = batchlab(*predict, "-c", SEED, "--model.hidden_sizes", "[8]")
    assert result.code == 0 and "note:" not in result.err


PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """batchlab's wheel, built from a copy of the checkout (the build leaves it as it was)."""
    root = tmp_path_factory.mktemp("wheel")
    tree = root / "tree"
    for folder in ("src", "configs"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    subprocess.run([*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", str(tree), "-w", str(root)],
                   check=True, capture_output=True, timeout=300)
    (built,) = root.glob("batchlab-*.whl")
    return built


def test_the_wheel_holds_every_module_and_the_configs(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        shipped = {n: archive.read(n) for n in names if n.startswith("batchlab/configs/")}
    assert {n: data for n, data in shipped.items() if n.endswith(".yaml")} == {
        f"batchlab/configs/{p.name}": p.read_bytes() for p in CONFIGS.glob("*.yaml")}
    # Every module of the source tree, subpackages included (a package left out of pyproject is not packaged).
    modules = {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "batchlab").rglob("*.py")}
    assert modules <= {n for n in names if n.endswith(".py")}, sorted(modules - set(names))


@pytest.mark.slow
def test_an_installed_batchlab_runs_its_configs_without_a_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([*PIP, "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    probe = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]; "
             "import batchlab; from batchlab.cli import main; import batchlab.study; print(batchlab.__file__); "
             "main(['fit', '--print_config'])")
    (tmp_path / "work").mkdir()  # no configs/ folder there
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path / "work", capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, _, printed = proc.stdout.partition("\n")
    assert where == str(site / "batchlab" / "__init__.py"), "the installed copy, not the checkout"
    config = yaml.safe_load(printed)
    assert config["trainer"]["max_epochs"] == 50 and config["data"]["init_args"]["predict_x"] == [[10.0, 11.0]]
