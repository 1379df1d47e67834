"""``BatchSizeSearch`` as a drop-in for Lightning's ``BatchSizeFinder`` (under ``Tuner.scale_batch_size`` and every
Trainer method), its trials seen through the module's hooks, ``batchlab.find_batch_size`` from Python, and
``--verbose``, which shows the Lightning chatter a search hides."""

import pytest
from conftest import CONFIGS, QUIET, SEED, plain_trainer, run_command
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

from batchlab.data import ToyRegressionData
from batchlab.errors import ConfigError
from batchlab.model import MLPRegressor
from batchlab.tune import BatchSizeSearch, TuneResult, format_tune

HOOKS = {f"on_{stage}_{edge}" for stage in ("train", "validation", "test", "predict") for edge in ("start", "end")}


class CountsItsStarts(MLPRegressor):
    """Its own ``on_train_start`` must still run, once per trial, while the search watches the hook."""

    starts = 0

    def on_train_start(self):
        self.starts += 1


def test_lightnings_tuner_runs_the_search_in_place_of_its_own_finder(tmp_path, monkeypatch):
    import lightning.pytorch.callbacks.batch_size_finder as finder_module
    from lightning.pytorch.tuner import Tuner

    built = []

    def search(**options):  # Tuner builds its finder from this module attribute, by keyword
        built.append(BatchSizeSearch(**options))
        return built[-1]

    monkeypatch.setattr(finder_module, "BatchSizeFinder", search)
    model, data, trainer = CountsItsStarts(), ToyRegressionData(n_samples=1000), plain_trainer(tmp_path)
    found = Tuner(trainer).scale_batch_size(model, datamodule=data, mode="binsearch", margin=0.2, max_val=100)
    (finder,) = built
    result = finder.result
    # Lightning's answer is max_val, never run, less its margin (80); the search's is the largest size run, less it.
    assert found == result.batch_size == data.batch_size == trainer.train_dataloader.batch_size == 51
    assert [(t.batch_size, t.ok, t.steps) for t in result.trials] == [(2**k, True, 3) for k in range(1, 7)]
    assert result.untried_corrected_from == 100 and result.before_margin == 64 and result.stage == "fit"
    assert result.stopped_because == "max_val" and result.dataset_size == 1000
    assert model.starts == len(result.trials) and not HOOKS & set(vars(model)), "the hooks are the model's again"


class SizedBoring(BoringModel):
    """Lightning's demo model with every loader at ``batch_size``, over 64 samples."""

    def __init__(self):
        super().__init__()
        self.batch_size = 2

    def _loader(self):
        return DataLoader(RandomDataset(32, 64), batch_size=self.batch_size)

    train_dataloader = val_dataloader = test_dataloader = predict_dataloader = _loader


@pytest.mark.parametrize("method", ["validate", "test", "predict"])
def test_the_search_runs_under_an_evaluation_method_on_its_loop(tmp_path, method):
    model, finder = SizedBoring(), BatchSizeSearch(max_trials=3, steps_per_trial=2)
    trainer = plain_trainer(tmp_path, callbacks=[finder])
    getattr(trainer, method)(model)
    result = finder.result
    assert result.stage == method and result.stopped_because == "max_trials" and result.dataset_size == 64
    # Lightning's finder limits the batches of validate's and test's loop to steps_per_trial, not predict's.
    steps = [64 // b if method == "predict" else 2 for b in (2, 4, 8)]
    assert [(t.batch_size, t.ok, t.steps) for t in result.trials] == list(zip((2, 4, 8), [True] * 3, steps))
    assert result.batch_size == model.batch_size == 8 and not HOOKS & set(vars(model))
    # ... and then the method itself ran over all the data, at the size found.
    assert getattr(trainer, f"num_{'val' if method == 'validate' else method}_batches") == [64 // 8]


@pytest.mark.parametrize(("mode", "sizes"), [("power", []), ("binsearch", [2])])
def test_max_trials_0_runs_as_lightnings_does(tmp_path, mode, sizes):
    from batchlab import find_batch_size

    # Lightning's power search then tries nothing and keeps init_val; its binsearch always runs one trial.
    result = find_batch_size(MLPRegressor(), ToyRegressionData(n_samples=64), mode=mode, max_trials=0, margin=0.0,
                             default_root_dir=tmp_path)
    assert [t.batch_size for t in result.trials] == sizes and result.batch_size == 2
    assert result.stopped_because == "max_trials" and result.found_was_tried is bool(sizes)
    if not sizes:
        assert "2 itself was never tried: no size tried ran" in format_tune(result)


def test_find_batch_size_searches_from_python_and_leaves_nothing_behind(tmp_path):
    from batchlab import find_batch_size

    result = find_batch_size(MLPRegressor(), ToyRegressionData(n_samples=256), mode="binsearch", max_val=64,
                             margin=0.0, accelerator="cpu", default_root_dir=tmp_path)
    assert isinstance(result, TuneResult)
    assert result.batch_size == 32 and result.stopped_because == "max_val" and result.untried_corrected_from == 64
    assert [t.batch_size for t in result.trials] == [2, 4, 8, 16, 32]
    assert list(tmp_path.iterdir()) == [], "no logs, no checkpoints, the search's own checkpoint removed"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_value": 64}, "max_value=64 is not allowed: use an argument of batchlab.tune.BatchSizeSearch or of"),
        ({"steps_per_trial": 0}, "steps_per_trial=0 is not allowed: use a positive integer"),
        ({"margin": 1.0}, "margin=1.0 is not allowed: use a number in [0, 1)"),
        ({"mode": "binary"}, "mode='binary' is not allowed: use one of 'power', 'binsearch'"),
        ({"max_val": 16384}, "max_val=16384 is not allowed with mode='power': Lightning's power search stops at 8192"),
    ],
)
def test_find_batch_size_refuses_a_bad_option_in_one_line(tmp_path, options, message):
    from batchlab import find_batch_size

    with pytest.raises(ConfigError) as err:
        find_batch_size(MLPRegressor(), ToyRegressionData(), default_root_dir=tmp_path, **options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_the_finder_takes_lightnings_arguments_in_lightnings_order_with_its_defaults():
    import inspect

    from lightning.pytorch.callbacks import BatchSizeFinder

    def signature(cls):
        return [(p.name, p.default) for p in inspect.signature(cls).parameters.values()]

    assert signature(BatchSizeSearch) == signature(BatchSizeFinder)
    assert BatchSizeSearch("Power").mode == "power", "as Lightning's, whatever the case"


# Lightning's lines between a search's trials: a short fit's stop, the restore of the search's checkpoint and its
# warning, and, after a search inside a fit, the restore named again.
CHATTER = ("`Trainer.fit` stopped: `max_steps=3` reached", "Restoring states from the checkpoint path",
           "weights_only", ".scale_batch_size_")


# slow: the default suite must stay under 5 minutes on 2 cores; the others cover this path there too.
@pytest.mark.slow
def test_the_chatter_between_trials_is_hidden_unless_verbose(tmp_path):
    # Subprocesses: under pytest, Lightning's loggers write to pytest's handlers, not to the terminal.
    find = str(CONFIGS / "find_batch_size.yaml")
    quiet = run_command(tmp_path, "fit", "-c", SEED, *QUIET, "-c", find, "--trainer.max_epochs", "1")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "batch search  from 2 to 4" in quiet.stdout
    assert not [line for line in CHATTER if line in quiet.stdout + quiet.stderr], quiet.stderr
    verbose = run_command(tmp_path, "tune", "-c", SEED, *QUIET, "--verbose", "--max_trials", "2")
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert [line for line in CHATTER if line in verbose.stderr] == list(CHATTER), verbose.stderr


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict", "tune", "study"])
def test_every_command_takes_verbose(batchlab, command):
    result = batchlab(command, "--help")
    assert result.code == 0 and "--verbose" in result.out
