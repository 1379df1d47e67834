"""Rank 0 decides: under DDP every rank runs the same study, one fit after another, in step, but only rank 0's
figures count and only rank 0 reads or writes the study's folder. What it measures, reads or refuses is broadcast,
so that every rank takes the same decisions; a failure on rank 0 stops every rank. On one device (world size 1)
all of this is plain calls.

    ranks = Ranks(trainer.strategy, trainer.world_size)
    value = ranks.decide(lambda: folder_read(...))   # read on rank 0, the same value on every rank
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_only

from batchlab.errors import ConfigError, check


def global_rank() -> int:
    """This process' rank: 0 on one device."""
    # Lightning's rank_zero_only.rank is right from the start in every process it launches; the process group,
    # once up, is the authority.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return rank_zero_only.rank


class Ranks:
    """The ranks of a study's fits, as the strategy of its Trainers sees them.

    Args:
        strategy: The strategy the study's Trainers use (its collectives broadcast rank 0's results).
        world_size: Processes taking part: devices x nodes.
    """

    def __init__(self, strategy: Strategy, world_size: int) -> None:
        self.strategy, self.world_size = strategy, world_size

    @property
    def rank(self) -> int:
        return global_rank()

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def shared(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (``value`` itself on one device): the ranks measure together, but only
        rank 0's figures count, so that every rank takes the same decisions and stays in step."""
        return self.strategy.broadcast(value, src=0) if self.world_size > 1 else value

    def decide(self, work: Callable[[], Any]) -> Any:
        """``work()`` on rank 0 (the folder's reads and writes), its result on every rank. Should it fail, every
        rank stops: a failure on rank 0 alone would leave the others waiting in their next collective for ever.
        The others raise a refusal as it is, and exit quietly on any other error, which rank 0 reports."""
        if self.world_size == 1:
            return work()
        outcome: Any = None
        if self.is_global_zero:
            try:
                outcome = ("ok", work())
            except ConfigError as err:
                outcome = ("refused", str(err))
            except Exception as err:
                self.shared(("failed", None))
                raise err
        kind, value = self.shared(outcome)
        if kind == "refused":
            raise ConfigError(value)
        if kind == "failed":
            raise SystemExit(1)
        return value

    def check_divisible(self, name: str, batch_size: Optional[int]) -> None:
        """Refuse a global batch size that does not split evenly over the ranks."""
        w = self.world_size
        check(batch_size is None or batch_size % w == 0,
              f"{name}={batch_size} is not allowed on {w} devices: batch sizes are global, use a multiple of {w}")
