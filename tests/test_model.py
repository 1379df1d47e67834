"""MLPRegressor: the notebook's network under the same seed, the optimizer arguments, the logged metric names."""

import pytest
import torch
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_setattr

from batchlab.errors import ConfigError
from batchlab.model import MLPRegressor
from batchlab.notebook import MyNeuralNet


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_seed_gives_the_notebooks_initial_weights(seed):
    torch.manual_seed(seed)
    reference = MyNeuralNet()
    torch.manual_seed(seed)
    model = MLPRegressor()
    ours = [p for p in model.parameters()]
    theirs = [p for p in reference.parameters()]
    assert [p.shape for p in ours] == [p.shape for p in theirs]
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    x = torch.tensor([[10.0, 11.0], [1.0, 2.0]])
    assert torch.equal(model(x), reference(x))


def test_hidden_sizes_build_the_layers_and_an_empty_list_is_linear():
    model = MLPRegressor(n_features=3, hidden_sizes=[16, 4])
    linears = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 16), (16, 4), (4, 1)]
    linear = MLPRegressor(hidden_sizes=[])
    assert [type(m).__name__ for m in linear.net] == ["Linear"]


def test_lr_is_one_value_that_the_lr_finder_contract_can_set_and_the_optimizer_reads():
    model = MLPRegressor(lr=0.01, momentum=0.9)
    assert lightning_getattr(model, "lr") == 0.01
    lightning_setattr(model, "lr", 0.5)
    assert model.lr == 0.5 and model.hparams.lr == 0.5
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["momentum"] == 0.9
    adam = MLPRegressor(optimizer="adam", lr=3e-4).configure_optimizers()
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 3e-4


def test_validation_and_test_metrics_are_mse_mae_r2_under_their_stage():
    model = MLPRegressor()
    assert set(model.val_metrics.keys(keep_base=False)) == {"val/loss", "val/mae", "val/r2"}
    assert set(model.test_metrics.keys(keep_base=False)) == {"test/loss", "test/mae", "test/r2"}
    pred = torch.tensor([[1.0], [2.0], [4.0]])
    target = torch.tensor([[1.0], [3.0], [3.0]])
    model.val_metrics.update(pred, target)
    values = model.val_metrics.compute()
    assert values["val/loss"].item() == pytest.approx(2 / 3)
    assert values["val/mae"].item() == pytest.approx(2 / 3)
    assert values["val/r2"].item() == pytest.approx(1 - 2 / (8 / 3), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr=0.0"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"hidden_sizes": [8, 0]}, "hidden_sizes=[8, 0]"),
        ({"optimizer": "rmsprop"}, "optimizer='rmsprop'"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ],
)
def test_bad_model_values_are_refused(kwargs, message):
    with pytest.raises(ConfigError) as info:
        MLPRegressor(**kwargs)
    assert message in str(info.value)
