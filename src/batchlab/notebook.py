"""The seed notebook's training loop in plain PyTorch, kept as the reference batchlab is checked against.

``../shared/seed`` trains y = x1 + x2 with ``MyNeuralNet`` (2 -> 8 -> ReLU -> 1), MSE, SGD lr 0.001 and
``DataLoader(batch_size=2, shuffle=True)`` for 50 epochs. ``train`` is that loop, unchanged but for arguments; the
parity tests compare batchlab's per-step losses with it and ``scripts/bench.py`` times it. Run as a script it does
what the notebook does: ``python -m batchlab.notebook`` prints the loop's time and the prediction for [10, 11].
It imports nothing but torch, so that timing it as a whole process measures what the notebook costs.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn as nn
from torch.optim import SGD
from torch.utils.data import DataLoader, Dataset

NOTEBOOK_X = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]
NOTEBOOK_Y = [[3.0], [7.0], [11.0], [15.0]]


class MyDataset(Dataset):
    def __init__(self, x, y):
        self.x = torch.as_tensor(x).float()
        self.y = torch.as_tensor(y).float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, ix):
        return self.x[ix], self.y[ix]


class MyNeuralNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_to_hidden_layer = nn.Linear(2, 8)
        self.hidden_layer_activation = nn.ReLU()
        self.hidden_to_output_layer = nn.Linear(8, 1)

    def forward(self, x):
        x = self.input_to_hidden_layer(x)
        x = self.hidden_layer_activation(x)
        x = self.hidden_to_output_layer(x)
        return x


def train(
    x=NOTEBOOK_X,
    y=NOTEBOOK_Y,
    batch_size: int = 2,
    epochs: int = 50,
    lr: float = 1e-3,
    seed: Optional[int] = None,
    device: str = "cpu",
) -> tuple[nn.Module, list[float], float]:
    """Train as the notebook does; return the net, the loss of every step and the loop's seconds.

    ``seed`` is given to ``torch.manual_seed`` before anything else, as the parity tests require.
    """
    if seed is not None:
        torch.manual_seed(seed)
    ds = MyDataset(torch.as_tensor(x).to(device), torch.as_tensor(y).to(device))
    dl = DataLoader(ds, batch_size=batch_size, shuffle=True)
    mynet = MyNeuralNet().to(device)
    loss_func = nn.MSELoss()
    opt = SGD(mynet.parameters(), lr=lr)
    loss_history = []
    start = time.time()
    for _ in range(epochs):
        for data in dl:
            xb, yb = data
            opt.zero_grad()
            loss_value = loss_func(mynet(xb), yb)
            loss_value.backward()
            opt.step()
            loss_history.append(loss_value)
    end = time.time()
    return mynet, [v.item() for v in loss_history], end - start


if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, _, seconds = train(device=device)
    print(seconds)
    print(net(torch.tensor([[10.0, 11.0]], device=device)))
