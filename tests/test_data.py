"""ToyRegressionData and TensorBatches: the notebook's data, synthetic data, splits, and batches that match
``torch.utils.data.DataLoader`` (and ``DistributedSampler``) exactly, RNG stream included."""

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_setattr
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from batchlab.data import NOTEBOOK_X, NOTEBOOK_Y, BatchOrder, TensorBatches, ToyRegressionData, make_synthetic
from batchlab.errors import ConfigError


def _setup(dm: ToyRegressionData) -> ToyRegressionData:
    dm.setup("fit")
    return dm


def test_default_data_is_the_notebooks_four_points():
    dm = _setup(ToyRegressionData())
    x, y = dm.splits["train"]
    assert x.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]
    assert y.tolist() == [[3.0], [7.0], [11.0], [15.0]]
    assert x.dtype == y.dtype == torch.float32
    assert dm.batch_size == 2 and dm.hparams.shuffle and not dm.hparams.drop_last
    assert dm.predict_x.tolist() == [[10.0, 11.0]]
    assert set(dm.splits) == {"train"}


def test_synthetic_targets_are_feature_sums_plus_noise_of_the_given_std():
    x, y = make_synthetic(20_000, n_features=3, noise=0.0, x_range=(-2.0, 5.0), seed=3)
    assert x.shape == (20_000, 3) and y.shape == (20_000, 1)
    assert x.min() >= -2.0 and x.max() <= 5.0
    torch.testing.assert_close(y, x.sum(1, keepdim=True))
    x2, y2 = make_synthetic(20_000, n_features=3, noise=1.5, x_range=(-2.0, 5.0), seed=3)
    torch.testing.assert_close(x2, x)
    residual = y2 - x2.sum(1, keepdim=True)
    assert abs(residual.std().item() - 1.5) < 0.05
    assert abs(residual.mean().item()) < 0.05


def test_synthetic_data_depends_on_data_seed_only_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = make_synthetic(100, noise=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = make_synthetic(100, noise=1.0, seed=7)
    c = make_synthetic(100, noise=1.0, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_splits_are_disjoint_cover_the_data_and_depend_on_the_data_seed():
    dm = _setup(ToyRegressionData(n_samples=100, val_fraction=0.2, test_fraction=0.1, data_seed=5))
    full_x, _ = dm.full_data()
    sizes = {k: len(v[0]) for k, v in dm.splits.items()}
    assert sizes == {"train": 70, "val": 20, "test": 10}
    rows = torch.cat([dm.splits[k][0] for k in ("train", "val", "test")])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, full_x.tolist()))
    again = _setup(ToyRegressionData(n_samples=100, val_fraction=0.2, test_fraction=0.1, data_seed=5))
    assert torch.equal(again.splits["val"][0], dm.splits["val"][0])
    other = _setup(ToyRegressionData(n_samples=100, val_fraction=0.2, test_fraction=0.1, data_seed=6))
    assert not torch.equal(other.splits["val"][0], dm.splits["val"][0])


def test_a_held_out_split_has_at_least_two_samples():
    dm = _setup(ToyRegressionData(val_fraction=0.1))
    assert len(dm.splits["val"][0]) == 2 and len(dm.splits["train"][0]) == 2


@pytest.mark.parametrize(
    ("n", "batch_size", "shuffle", "drop_last"),
    [(4, 2, True, False), (10, 3, True, False), (10, 3, True, True), (10, 3, False, False), (7, 16, True, False),
     (1000, 32, True, False)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tensor_batches_equal_a_dataloaders_batches_and_rng_stream(n, batch_size, shuffle, drop_last, seed):
    x, y = make_synthetic(n, noise=1.0, seed=seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)
    fast = TensorBatches((x, y), batch_size, shuffle=shuffle, drop_last=drop_last)
    assert len(fast) == len(loader)
    torch.manual_seed(seed)
    expected = [[tuple(t) for t in loader] for _ in range(3)]
    after_loader = torch.get_rng_state()
    torch.manual_seed(seed)
    got = [[tuple(t) for t in fast] for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), after_loader)
    for epoch_expected, epoch_got in zip(expected, got):
        assert len(epoch_got) == len(epoch_expected)
        for (ex, ey), (gx, gy) in zip(epoch_expected, epoch_got):
            assert torch.equal(ex, gx) and torch.equal(ey, gy)
    if shuffle and n > batch_size:
        assert not torch.equal(got[0][0][0], got[1][0][0]), "each epoch reshuffles"


@pytest.mark.parametrize(("n", "world"), [(10, 2), (11, 3), (4096, 2), (5, 4)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_sharded_order_matches_distributed_sampler_and_covers_the_data(n, world, shuffle):
    for epoch in range(3):
        shards = []
        for rank in range(world):
            order = BatchOrder(n, shuffle, rank=rank, world_size=world, seed=42)
            order.set_epoch(epoch)
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=42)
            sampler.set_epoch(epoch)
            assert order.indices().tolist() == list(sampler)
            shards.append(order.indices())
        assert {len(s) for s in shards} == {len(shards[0])}, "every rank runs the same number of batches"
        assert set(torch.cat(shards).tolist()) == set(range(n))
        if n % world == 0:
            assert len(torch.cat(shards).unique()) == n, "shards are disjoint"


def test_batches_sliced_without_shuffle_are_views_of_the_data():
    x, y = make_synthetic(10)
    first = next(iter(TensorBatches((x, y), 4)))
    assert first[0].data_ptr() == x.data_ptr()


def test_the_batch_size_lives_in_one_place_that_the_dataloaders_read():
    """Lightning's batch-size finder sets ``batch_size`` through lightning_setattr and rebuilds the loaders."""
    dm = ToyRegressionData(n_samples=64)
    model = LightningModule()
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(model)
    model.trainer = trainer
    trainer.datamodule = dm
    dm.trainer = trainer
    dm.setup("fit")
    assert lightning_getattr(model, "batch_size") == 2
    lightning_setattr(model, "batch_size", 16)
    assert dm.batch_size == 16 and dm.hparams.batch_size == 16
    assert len(dm.train_dataloader()) == 4
    assert len(next(iter(dm.train_dataloader()))[0]) == 16


def test_a_batch_larger_than_the_data_trains_one_batch_per_epoch_with_a_warning():
    dm = _setup(ToyRegressionData(batch_size=8))
    with pytest.warns(UserWarning, match="batch_size=8 is larger than the 4 training samples"):
        loader = dm.train_dataloader()
    assert [len(b[0]) for b in loader] == [4]


def test_with_drop_last_a_batch_larger_than_each_devices_share_is_refused_and_warned_about_truthfully():
    ToyRegressionData(batch_size=4, drop_last=True).check_training_batches()
    with pytest.raises(ConfigError, match=r"batch_size=5 with drop_last=true .* 4 samples; use batch_size <= 4"):
        ToyRegressionData(batch_size=5, drop_last=True).check_training_batches()
    # 7 samples on 2 devices: 4 per device, the last padded as DistributedSampler pads it.
    ToyRegressionData(n_samples=7, batch_size=4, drop_last=True).check_training_batches(world_size=2)
    with pytest.raises(ConfigError, match="7 samples, 4 per device on 2 devices; use batch_size <= 4"):
        ToyRegressionData(n_samples=7, batch_size=5, drop_last=True).check_training_batches(world_size=2)
    # Held-out splits leave fewer training samples.
    with pytest.raises(ConfigError, match="the training split has 8 samples"):
        ToyRegressionData(n_samples=10, val_fraction=0.2, batch_size=9, drop_last=True).check_training_batches()
    ToyRegressionData(batch_size=10).check_training_batches()  # without drop_last: one batch of 4
    # The finder builds the loader past the data; the loader only warns, and says what happens.
    dm = _setup(ToyRegressionData(batch_size=8, drop_last=True))
    with pytest.warns(UserWarning, match="each epoch trains no batch"):
        loader = dm.train_dataloader()
    assert list(loader) == []


def test_eval_batch_size_defaults_to_the_training_batch_size():
    dm = _setup(ToyRegressionData(n_samples=100, batch_size=8, val_fraction=0.2))
    assert [len(b[0]) for b in dm.val_dataloader()] == [8, 8, 4]
    dm = _setup(ToyRegressionData(n_samples=100, batch_size=8, val_fraction=0.2, eval_batch_size=64))
    assert [len(b[0]) for b in dm.val_dataloader()] == [20]


def test_no_validation_split_gives_no_validation_batches_and_test_without_split_is_an_error():
    dm = _setup(ToyRegressionData())
    assert list(dm.val_dataloader()) == []
    with pytest.raises(ConfigError, match="test_fraction"):
        dm.test_dataloader()


def test_notebook_data_with_noise_changes_only_the_targets():
    dm = ToyRegressionData(noise=0.5, data_seed=1)
    x, y = dm.full_data()
    assert x.tolist() == NOTEBOOK_X
    assert not torch.equal(y, torch.tensor(NOTEBOOK_Y))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": -3}, "batch_size=-3"),
        ({"batch_size": 1.5}, "batch_size=1.5"),
        ({"n_samples": 0}, "n_samples=0"),
        ({"noise": -1.0}, "noise=-1.0"),
        ({"noise": float("nan")}, "noise=nan"),
        ({"val_fraction": 1.5}, "val_fraction=1.5"),
        ({"test_fraction": -0.1}, "test_fraction=-0.1"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "leaves no training data"),
        ({"val_fraction": 0.5, "test_fraction": 0.4}, "leaves no training sample"),
        ({"n_features": 3}, "n_features=3 needs synthetic data"),
        ({"predict_x": [[1.0, 2.0, 3.0]]}, "has 3 values"),
        ({"predict_x": []}, "predict_x=[]"),
        ({"predict_x": [[1.0, float("inf")]]}, "use a list of lists of finite numbers"),
        ({"x_range": (5.0, 1.0)}, "x_range=[5.0, 1.0]"),
        ({"eval_batch_size": 0}, "eval_batch_size=0"),
    ],
)
def test_bad_values_are_refused_with_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        ToyRegressionData(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"shuffle": "false"}, "shuffle='false' is not allowed: use true or false"),  # a truthy string is no bool
     ({"data_seed": 1.5}, "data_seed=1.5 is not allowed: use an integer"),
     ({"data_seed": True}, "data_seed=True is not allowed: use an integer")],
)
def test_plain_types_are_checked_from_python_as_the_command_line_checks_them(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ToyRegressionData(**kwargs)
