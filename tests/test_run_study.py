"""``batchlab.run_study``, the study from Python: the tiny configuration of tests/test_study.py given as keyword
arguments, the same folder the command writes, the result it prints, and options it does not know refused."""

import csv
import json

import pytest
import yaml
from conftest import STUDY
from lightning.fabric.utilities.seed import seed_everything
from test_study import TINY, _synthetic_step_times

from batchlab import run_study
from batchlab.data import ToyRegressionData
from batchlab.errors import ConfigError
from batchlab.files import jsonable
from batchlab.model import MLPRegressor
from batchlab.study import StudyResult, fitting, format_study, throughput


def _tiny():
    """TINY's model and data, built as the command builds them from configs/study.yaml and TINY's flags, and
    TINY's study options as run_study's keyword arguments."""
    config = yaml.safe_load(open(STUDY))
    flags = {flag[2:]: yaml.safe_load(value) for flag, value in zip(TINY[3::2], TINY[4::2])}
    data = {**config["data"]["init_args"], **{k[5:]: v for k, v in flags.items() if k.startswith("data.")}}
    seed_everything(config["seed_everything"], verbose=False)  # as --seed_everything does, before the model
    model = MLPRegressor(**config["model"]["init_args"])
    options = {k: v for k, v in flags.items() if not k.startswith("data.")}
    return model, ToyRegressionData(**data), options


def _names(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "tfevents" not in p.name)


def test_a_quick_study_from_python_writes_what_the_command_writes_and_returns_what_it_prints(batchlab, tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setattr(throughput, "StepTimer", _synthetic_step_times(2e-3, 1e-5))  # the same speed for both
    model, data, options = _tiny()
    result = run_study(model, data, **{**options, "out": "api"}, quick=True, accelerator="cpu")
    assert isinstance(result, StudyResult) and result.quick and not result.trials
    printed = batchlab(*TINY, "--quick", "--out", "cli")
    assert printed.code == 0, printed.err
    api, cli = tmp_path / "api", tmp_path / "cli"
    assert _names(api) == _names(cli)
    assert json.loads((api / "quick.json").read_text()) == jsonable(result)
    # The same seed, weights and data: the same noise scale, measured from Python or from the command line.
    def measured(path):  # less what it cost, in seconds as well as samples
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "_cost"}

    assert measured(api / "gns.json") == measured(cli / "gns.json")
    assert result.noise_scale.b_simple == json.loads((cli / "gns.json").read_text())["b_simple"]
    assert printed.out == format_study(result).replace("folder   api", "folder   cli") + "\n"


@pytest.mark.slow  # the command's tiny full study, test_study.py's, runs by default
def test_a_tiny_full_study_from_python_resumes_from_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, data, options = _tiny()
    result = run_study(model, data, **options, accelerator="cpu", devices=1)
    root = tmp_path / "study"
    assert json.loads((root / "summary.json").read_text()) == jsonable(result)
    assert result.grid == [2, 8, 32, 64, 256] and result.recommended_batch_size in result.grid
    assert len(result.trials) == len(list(csv.DictReader((root / "results.csv").open()))) == 5 * 2
    best = next(e for e in result.batch_sizes if e.batch_size == result.recommended_batch_size)
    assert best.regret == 1.0 and best.lr == result.recommended_lr
    assert "Recommended batch size" in format_study(result) and (root / "report.md").is_file()

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished measurement was repeated")

    monkeypatch.setattr(fitting.Fitter, "fit", no_fit)
    again = run_study(*_tiny()[:2], **options, accelerator="cpu", devices=1)
    assert jsonable(again) == jsonable(result) and again.trials == result.trials


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"acelerator": "cpu"}, "acelerator is not allowed in run_study: use study settings (target, monitor,"),
        ({"max_epochs": 3, "tagret": 1}, "max_epochs, tagret are not allowed in run_study"),
        ({"max_steps": 0}, "max_steps=0 is not allowed: use a positive integer"),
        ({"lr_rule": "cubic"}, "lr_rule='cubic' is not allowed: use one of 'none', 'linear', 'sqrt'"),
    ],
)
def test_an_option_run_study_does_not_take_is_refused_naming_it_and_what_is_allowed(tmp_path, monkeypatch, options,
                                                                                     message):
    monkeypatch.chdir(tmp_path)
    model, data, _ = _tiny()
    with pytest.raises(ConfigError) as refused:
        run_study(model, data, target=1.5, **options)
    assert message in str(refused.value)
    if "run_study" in message:
        assert "accelerator" in str(refused.value) and "quick" in str(refused.value)
    assert list(tmp_path.iterdir()) == [], "refused before anything is written"
