"""Each use of Lightning's private API (``batchlab._lightning``) against the Lightning installed: these fail loudly,
naming the use, if a Lightning release renames or changes what batchlab relies on."""

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import BatchSizeFinder

from batchlab import _lightning
from batchlab.data import ToyRegressionData
from batchlab.model import MLPRegressor


def _trainer(tmp_path, callbacks, **kwargs):
    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   accelerator="cpu", default_root_dir=tmp_path, callbacks=callbacks, **kwargs)


class _Trained(Callback):
    def __init__(self):
        self.batch_sizes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_sizes.append(len(batch[0]))


def test_a_finder_set_to_stop_after_its_search_ends_the_fit_there(tmp_path):
    finder = BatchSizeFinder(max_trials=2, steps_per_trial=1)
    assert finder._early_exit is False, "BatchSizeFinder no longer has the _early_exit flag Tuner sets"
    _lightning.stop_after_search(finder)
    trained = _Trained()
    trainer = _trainer(tmp_path, [finder, trained], max_epochs=1)
    trainer.fit(MLPRegressor(), ToyRegressionData(n_samples=64, batch_size=2))
    assert finder.optimal_batch_size == 4, "the search ran its two trials"
    assert trained.batch_sizes == [], "and the fit stopped after it, training nothing"


def test_rebuilt_dataloaders_read_the_batch_size_set_since_they_were_built(tmp_path):
    data = ToyRegressionData(n_samples=64, batch_size=4)

    class Resize(Callback):
        def on_train_start(self, trainer, pl_module):
            data.batch_size = 16
            _lightning.rebuild_dataloaders(trainer)

    trained = _Trained()
    trainer = _trainer(tmp_path, [Resize(), trained], max_epochs=1)
    trainer.fit(MLPRegressor(), data)
    assert trained.batch_sizes == [16] * 4


def test_ddp_ranks_are_told_apart_from_spawned_ones(tmp_path):
    for strategy, lasting in (("ddp", True), ("ddp_spawn", False), ("auto", False)):
        trainer = _trainer(tmp_path, [], strategy=strategy, devices=2 if strategy != "auto" else 1)
        assert _lightning.runs_fits_in_this_process(trainer.strategy) is lasting, strategy
