"""The ``batchlab`` command: LightningCLI over the toy data and the MLP, with one-line errors.

    batchlab fit -c configs/seed.yaml                      # the notebook's experiment
    batchlab fit -c configs/seed.yaml --data.batch_size 4  # another batch size
    batchlab predict -c configs/seed.yaml --ckpt_path runs/seed/version_0/checkpoints/last.ckpt
    batchlab fit --help                                    # every option, from the constructors' Args

Subcommands are LightningCLI's ``fit``, ``validate``, ``test`` and ``predict``. Configuration is YAML under
``configs/``, stacked with repeated ``-c``. Bad input ends in a single ``batchlab: error: ...`` line on stderr and
exit status 2, never a traceback. Tests call ``main([...])``.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any, Literal, Optional

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from batchlab.data import ToyRegressionData
from batchlab.errors import ConfigError
from batchlab.model import MLPRegressor
from batchlab.summary import PredictionPrinter, RunSummary, format_summary
from batchlab.tune import BatchSizeSearch, check_not_distributed, format_tune, run_tune, write_tune


class BatchlabParser(LightningArgumentParser):
    """LightningCLI's parser, raising ``ArgumentError`` instead of printing usage and exiting, so that ``main``
    reports every bad value the same way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)


class BatchlabTrainer(Trainer):
    """Lightning's Trainer plus ``tune``, which LightningCLI turns into the ``batchlab tune`` subcommand."""

    def tune(
        self,
        model: LightningModule,
        datamodule: Optional[LightningDataModule] = None,
        mode: Literal["power", "binsearch"] = "power",
        init_val: int = 2,
        max_trials: int = 25,
        steps_per_trial: int = 3,
        max_val: int = 8192,
        margin: float = 0.05,
    ) -> dict[str, Any]:
        """Find the largest batch size that fits in memory with Lightning's batch-size finder.

        Args:
            model: The model, from the config.
            datamodule: The data, from the config.
            mode: ``power`` doubles the batch size until it fails or reaches a cap; ``binsearch`` then bisects.
            init_val: First batch size tried.
            max_trials: Most batch sizes tried.
            steps_per_trial: Training steps at each size.
            max_val: Largest batch size tried; on a CPU, where nothing runs out of memory, this is the cap.
            margin: Fraction taken off the size ``binsearch`` finds, as a safety buffer.
        """
        finder = BatchSizeSearch(mode, steps_per_trial, init_val, max_trials, max_val, margin)
        result = run_tune(self, model, datamodule, finder)
        if self.is_global_zero:
            path = write_tune(result, self.log_dir or ".")
            print(format_tune(result, path))
        return result


class BatchlabCLI(LightningCLI):
    """LightningCLI with the model's input width linked to the data's and a ``tune`` subcommand."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "tune": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.n_features", "model.n_features")

    def before_fit(self) -> None:
        if any(isinstance(c, BatchSizeSearch) for c in self.trainer.callbacks):
            check_not_distributed(self.trainer)

    def before_tune(self) -> None:
        check_not_distributed(self.trainer)

    # Reports are printed here rather than in the callbacks so that they come after the progress bar's last line.
    def after_fit(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunSummary) and callback.summary and self.trainer.is_global_zero:
                print(format_summary(callback.summary))

    def before_predict(self) -> None:
        # Only predict needs it; every callback costs each training step a call per hook.
        self.trainer.callbacks.append(PredictionPrinter())

    def after_predict(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, PredictionPrinter) and self.trainer.is_global_zero:
                print("\n".join(callback.lines()))


def make_cli(args: Optional[list[str]] = None, run: bool = True) -> BatchlabCLI:
    """Build (and with ``run``, execute) the CLI for ``args``."""
    return BatchlabCLI(
        MLPRegressor,
        ToyRegressionData,
        trainer_class=BatchlabTrainer,
        parser_class=BatchlabParser,
        # The optimizer is configured through the model's own lr/optimizer/momentum, the one way batchlab has.
        auto_configure_optimizers=False,
        trainer_defaults={"callbacks": [RunSummary(verbose=False)]},
        args=args,
        run=run,
    )


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def _quiet_lightning() -> None:
    """Drop the start-up noise that says nothing about the run: advertising tips, an empty validation set's
    warning (no validation split is the notebook's setting), and warnings about Lightning's own internals."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_a_tip)
    warnings.filterwarnings("ignore", message="Total length of .* across ranks is zero")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``batchlab`` command."""
    _quiet_lightning()
    try:
        make_cli(args)
    except (ConfigError, ArgumentError, MisconfigurationException, FileNotFoundError) as err:
        print(f"batchlab: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "list": "a list",
    "dict": "a mapping",
    "NoneType": "null",
}


def one_line(err: BaseException) -> str:
    """Condense an error message (jsonargparse's are several indented lines) into one readable line."""
    text = str(err).strip()
    key = re.match(r'Parser key "([^"]+)":', text)
    value = re.search(r"(?:Given|Got) value: (.*)", text)
    if key and key.group(1) != "config" and value:
        expected = []
        for name in re.findall(r"Expected a (<class '[\w.]+'>|typing\.Literal\[[^\]]*\])", text):
            literal = re.match(r"typing\.Literal\[(.*)\]", name)
            expected.append("one of " + literal.group(1) if literal else _TYPE_NAMES.get(name[8:-2], name))
        if expected:
            allowed = " or ".join(dict.fromkeys(expected))
            return f"{key.group(1)}={value.group(1).strip()!r} is not allowed: use {allowed}"
    line = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if "does not accept option" in line or "unrecognized arguments" in line:
        line += " (--help lists the accepted keys)"
    return line


if __name__ == "__main__":
    main()
