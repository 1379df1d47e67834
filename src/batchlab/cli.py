"""The ``batchlab`` command: LightningCLI over any LightningModule and LightningDataModule (the toy data and the
MLP by default), with ``tune`` and ``study`` subcommands and one-line errors.

    batchlab fit                                           # the notebook's experiment (configs/seed.yaml)
    batchlab fit --data.batch_size 4                       # another batch size
    batchlab predict --ckpt_path runs/seed/version_0/checkpoints/epoch=49-step=100.ckpt
    batchlab study --quick                                 # the default study (configs/study.yaml), in seconds
    batchlab fit --help                                    # every option, from the constructors' Args

Subcommands are LightningCLI's ``fit``, ``validate``, ``test`` and ``predict``, plus ``tune`` and ``study``.
Without ``-c`` they take the seed experiment's configuration (``study``: the default study's), which ships with the
package; a ``-c`` of your own is used as given, and repeated ``-c`` stack. The model and the data default to
``batchlab.model.MLPRegressor`` and ``batchlab.data.ToyRegressionData``; ``--model.class_path`` and
``--data.class_path`` (or a config's ``class_path``) take any other (``batchlab.arguments``). Bad input ends in a
single ``batchlab: error: ...`` line on stderr and exit status 2, never a traceback, and before anything is written
(``batchlab.preflight``). A fit stopped by Ctrl+C or SIGTERM saves a checkpoint and its summary, says in one line
how to resume, and exits with 130 or 143. Tests call ``main([...])``.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, Optional

import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from batchlab.arguments import amend, expand_switches, given_settings, verbose_flag
from batchlab.errors import ConfigError, one_line
from batchlab.preflight import (check_callbacks, check_checkpoint, check_config_files, check_data, check_run,
                                replaced_by_checkpoint)
from batchlab.quiet import STARTUP_LINES, drop_noise, set_verbose
from batchlab.runs import global_seed
from batchlab.signals import RunInterrupted, StopTogether, noting_signals, signal_of
from batchlab.summary import FitSummary, PredictionPrinter, RunSummary, format_summary
from batchlab.tune import BatchSizeSearch, TuneResult, check_not_distributed, format_tune, run_tune, write_tune


class BatchlabParser(LightningArgumentParser):
    """LightningCLI's parser, raising ``ArgumentError`` instead of printing usage and exiting, so that ``main``
    reports every bad value the same way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)


class BatchlabTrainer(Trainer):
    """Lightning's Trainer plus ``tune`` and ``study``, which LightningCLI turns into subcommands, and a ``fit``
    that reports an interrupted run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The study builds a fresh Trainer for each of its runs from these (accelerator, devices, precision...).
        self.init_kwargs = dict(kwargs)
        self.study_config: Optional[dict[str, Any]] = None
        super().__init__(*args, **kwargs)

    def fit(self, *args: Any, **kwargs: Any) -> None:
        """Train the model, report its speed and loss, and stop cleanly on Ctrl+C or SIGTERM.

        (``batchlab --help`` shows the paragraph above.) Lightning's fit: when a signal stops it, Lightning has
        already run every ``on_exception`` hook (the checkpoint callback saved) and ends with ``SystemExit``:
        ``sys.exit(1)`` after Ctrl+C, ``SIGTERMException`` (exit status 0) after SIGTERM. This writes the run's
        summary and turns both into ``RunInterrupted``.

        Under DDP, ``StopTogether`` takes the signals from here on (``batchlab.signals``): by default one that
        came while Lightning starts the other processes would kill this one and leave them waiting for ever."""
        # Lightning's start-up lines, held by ``main``: the input has passed every check made before a fit (the tune
        # command's options included). Not a callback's ``setup``: a callback costs every step a call per hook.
        STARTUP_LINES.show()
        together = next((c for c in self.callbacks if isinstance(c, StopTogether)), None)
        try:
            with noting_signals(together.handle if together else None):
                super().fit(*args, **kwargs)
        except BaseException as exc:
            if not self.interrupted:
                raise
            summaries = [cb.finish_interrupted(self) for cb in self.callbacks if isinstance(cb, RunSummary)]
            summary = next((s for s in summaries if s is not None), None)
            signame = signal_of(exc)
            if signame is None:
                raise  # an error, not a signal: its traceback is the report
            raise RunInterrupted(signame, _interrupted_message(self, signame, summary), summary) from None

    def tune(self, model: LightningModule, datamodule: Optional[LightningDataModule] = None,
             **finder_options: Any) -> TuneResult:
        """Find the largest batch size that fits in memory with Lightning's batch-size finder.

        Args:
            model: The model, from the config.
            datamodule: The data, from the config.
            finder_options: The options of ``batchlab.tune.BatchSizeSearch``, each a flag (``--mode``...).
        """
        finder = BatchSizeSearch(**finder_options)
        result = run_tune(self, model, datamodule, finder)
        if self.is_global_zero:
            path = write_tune(result, self.log_dir or ".")
            print(format_tune(result, path))
        return result

    def study(self, model: LightningModule, datamodule: Optional[LightningDataModule] = None,
              **settings: Any) -> Any:
        """Measure speed and steps to a target per batch size, and recommend the one that gets there soonest.

        Args:
            model: The model, from the config; every run starts from its initial weights.
            datamodule: The data, from the config.
            settings: What the study measures: the fields of ``batchlab.study.StudySettings``.
        """
        from batchlab.study import Study, format_study
        from batchlab.study.settings import StudySettings  # alone: jsonargparse reads the flags from it

        # Every fit of the study starts from the run's seed (--seed_everything), so that all start alike.
        study = Study(model, datamodule, self.init_kwargs, StudySettings(**settings), global_seed() or 0,
                      self.study_config)
        result = study.run()
        if study.ranks.is_global_zero:  # under DDP every rank holds the same results; one prints them
            print(format_study(result))
        return result


class BatchlabCLI(LightningCLI):
    """LightningCLI with the model's input width linked to the data's, ``tune`` and ``study`` subcommands, and
    checks of the configuration before anything runs."""

    # Each subcommand's Trainer arguments left out of its flags. validate's and test's own ``verbose`` (print the
    # results, which they then always do) gives way to batchlab's ``--verbose``, the same flag for every command.
    SUBCOMMANDS = {**{name: skip | {"verbose"} for name, skip in LightningCLI.subcommands().items()},
                   "tune": {"model", "datamodule"}, "study": {"model", "datamodule"}}

    def __init__(self, *args: Any, only: Optional[str] = None, **kwargs: Any) -> None:
        self.only = only if only in self.SUBCOMMANDS else None
        self.given: dict[str, str] = {}  # the model settings the user gave (batchlab.arguments.given_settings)
        self.model_as_given: Any = None  # the model's configuration before a checkpoint's hyperparameters
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]
        # Only the parser of the command being run is built (each costs a tenth of a second of signature and
        # docstring introspection); without one, as for ``batchlab --help``, all of them.
        return {self.only: self.SUBCOMMANDS[self.only]} if self.only else self.SUBCOMMANDS

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Applies only where both classes have the argument, as batchlab's own do.
        parser.link_arguments("data.init_args.n_features", "model.init_args.n_features")
        # Read by ``main`` before the command runs (``_verbose``): the chatter it shows comes from inside the run.
        parser.add_argument("--verbose", type=bool, default=False,
                            help="Show Lightning's chatter between the short fits of a batch-size search or a study.")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        configured = {id(c) for c in self._subcommand_config().get("trainer.callbacks") or []}
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except ValueError as err:  # the Trainer's own refusals (an unknown accelerator or strategy, num_nodes=0)
            raise ConfigError(str(err)) from err
        # Lightning adds a ModelCheckpoint when none is configured; batchlab's also saves when a fit is interrupted,
        # so that Ctrl+C or SIGTERM leaves a checkpoint of the step reached. Across several processes only when
        # StopTogether has stopped every rank at the same step: that save waits for every rank, so after an error
        # on one rank it would hang. A configured ModelCheckpoint keeps its own settings.
        own = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and id(c) not in configured]
        for callback in own:
            callback.save_on_exception = trainer.world_size == 1
        if trainer.world_size > 1:
            trainer.callbacks.append(StopTogether(checkpoints=own))
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is None or isinstance(args, (list, tuple)):
            args = list(sys.argv[1:] if args is None else args)
            check_config_files(args)
            self.given = given_settings(args, self.subcommands())
            args = amend(args, self.subcommands())
        super().parse_arguments(parser, args)
        # Checked here because LightningCLI loads the checkpoint next, to read its hyperparameters.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None:
            check_checkpoint(ckpt_path, subcommand)
            self.model_as_given = self.config[subcommand].get("model").clone()

    def before_instantiate_classes(self) -> None:
        # LightningCLI has replaced the model's settings with the checkpoint's: say so where the user gave others.
        if self.model_as_given is not None:
            note = replaced_by_checkpoint(self.given, self.model_as_given, self.config[self.subcommand].get("model"))
            if note and rank_zero_only.rank == 0:
                print(f"batchlab: note: {note}", file=sys.stderr)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        check_run(self.trainer)
        check_data(self.datamodule, self.trainer, self.subcommand)
        check_callbacks(self.model, self.datamodule, self.trainer, self.subcommand)

    def _subcommand_config(self) -> Any:
        return self.config_init[self.subcommand] if self.subcommand else self.config_init

    def before_fit(self) -> None:
        # Before Lightning launches the other processes, and before the fit writes its run folder.
        for finder in (c for c in self.trainer.callbacks if isinstance(c, BatchSizeSearch)):
            check_not_distributed(self.trainer)
            finder.check_holder(self.model, self.datamodule)

    def before_study(self) -> None:
        # What the study measures, for its fingerprint: the configuration less what only says where to write.
        dumped = yaml.safe_load(self._parser("study").dump(self.config["study"], skip_none=False))
        config = {k: dumped.get(k) for k in ("seed_everything", "trainer", "model", "data")}
        for key in ("logger", "callbacks", "enable_progress_bar", "enable_model_summary", "default_root_dir"):
            config.get("trainer", {}).pop(key, None)
        self.trainer.study_config = config

    # Reports are printed here rather than in the callbacks so that they come after the progress bar's last line.
    def after_fit(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunSummary) and callback.summary and self.trainer.is_global_zero:
                print(format_summary(callback.summary))

    def before_validate(self) -> None:
        STARTUP_LINES.show()  # fit and tune show them in BatchlabTrainer.fit, the study once its checks pass

    def before_test(self) -> None:
        STARTUP_LINES.show()

    def before_predict(self) -> None:
        STARTUP_LINES.show()
        # A prediction prints; it leaves no run folder behind (a config, hyperparameters and an empty event file
        # in a new version_N per call). Validate and test keep theirs: their metrics are a record.
        self.trainer.loggers = []
        self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, SaveConfigCallback)]
        # Only predict needs it; every callback costs each training step a call per hook.
        self.trainer.callbacks.append(PredictionPrinter())

    def after_predict(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, PredictionPrinter) and self.trainer.is_global_zero:
                print("\n".join(callback.lines()))


def make_cli(args: Optional[list[str]] = None, run: bool = True) -> BatchlabCLI:
    """Build (and with ``run``, execute) the CLI for ``args``."""
    only = next((a for a in args or [] if a in BatchlabCLI.SUBCOMMANDS), None)
    return BatchlabCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=BatchlabTrainer,
        parser_class=BatchlabParser,
        # The optimizer is configured through the model's own lr/optimizer/momentum, the one way batchlab has.
        auto_configure_optimizers=False,
        trainer_defaults={"callbacks": [RunSummary(verbose=False)]},
        args=args,
        run=run,
        only=only,
    )


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``batchlab`` command."""
    drop_noise()
    args = expand_switches(sys.argv[1:] if args is None else list(args))
    set_verbose(verbose_flag(args))
    STARTUP_LINES.hold()
    try:
        make_cli(args)
    except (ConfigError, ArgumentError, MisconfigurationException, FileNotFoundError) as err:
        _fail(one_line(err, args))
    except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as err:
        # A path that cannot be used, should one get past batchlab.preflight's checks.
        _fail(f"{err.filename!r} cannot be used: {err.strerror}" if err.filename else one_line(err))
    except RunInterrupted as stop:
        STARTUP_LINES.show()  # before the report, in the order they were said
        if stop.summary is not None:
            print(format_summary(stop.summary))
        if stop.message is not None:
            print(f"batchlab: {stop.message}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except ValueError as err:
        # jsonargparse builds the classes while it checks the types and wraps what their constructors raise.
        cause = _config_error_in(err)
        if cause is None:
            raise
        _fail(one_line(cause))
    except KeyboardInterrupt:  # Ctrl+C before or after a fit, where Lightning does not handle it
        STARTUP_LINES.show()
        print("batchlab: interrupted", file=sys.stderr)
        sys.exit(RunInterrupted("SIGINT", None).exit_code)
    finally:
        # Whatever ended the command before it ran (--help, a traceback) shows them, as Lightning would have.
        STARTUP_LINES.show()
        set_verbose(False)  # a later command in this process asks again


def _fail(message: str) -> None:
    STARTUP_LINES.drop()
    print(f"batchlab: error: {message}", file=sys.stderr)
    sys.exit(2)


def _interrupted_message(trainer: Trainer, signame: str, summary: Optional[FitSummary]) -> Optional[str]:
    if not trainer.is_global_zero:
        return None
    where = f"interrupted by {signame} at epoch {trainer.current_epoch}, step {trainer.global_step}"
    if summary is None or not summary.checkpoint:
        return f"{where}; no checkpoint was saved, nothing to resume from"
    return f"{where}; resume from step {summary.checkpoint_step} with --ckpt_path {summary.checkpoint}"


def _config_error_in(err: BaseException) -> Optional[ConfigError]:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
