"""Checks made before a command runs anything, so that a bad setting or an unusable path is refused with one line
while nothing has been written yet.

``batchlab.cli`` calls them for every subcommand: ``check_config_files(args)`` before the command line is parsed,
``check_checkpoint(ckpt_path)`` as soon as it is (LightningCLI loads the checkpoint right after, to read its
hyperparameters; ``replaced_by_checkpoint`` then says which of the user's model settings they replaced) and
``check_run(trainer)`` once the trainer is built. Each covers a case where jsonargparse or
Lightning would otherwise say too little or go wrong late:

- a config file that is missing, which jsonargparse reports without saying what to give instead, or that is not
  YAML, which jsonargparse reports without naming the file;
- settings the Trainer accepts and fails on mid-run, with a traceback (``accumulate_grad_batches=0`` divides by
  zero at the first step) or silently (a negative ``gradient_clip_val`` flips the gradients);
- a checkpoint that is missing, which Lightning finds only after the logger has started writing a new run
  folder, or that Lightning cannot use, which ends in a traceback: not a checkpoint, a zip archive torch did not
  write, a torch file without Lightning's keys, one holding objects torch's weights-only loader refuses, or, to
  resume a fit, the weights alone;
- a run folder that cannot be created (read-only, or under a file), which Lightning finds mid-setup with a
  traceback;
- a batch size that leaves no training batch (``drop_last`` and a batch larger than each device's share of the
  training split), where Lightning would train nothing, say only "No training batches" and exit 0;
- ``batchlab test`` without a test split, which the test dataloader finds only once the run folder is written;
- a run folder that already holds a run (an explicit ``--trainer.logger.init_args.version``, or no logger and a
  used ``default_root_dir``): Lightning's logger writes into it and LightningCLI then stops on ``config.yaml``.
  batchlab never writes over an earlier run.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from batchlab.arguments import config_values, inline_config
from batchlab.data import ToyRegressionData
from batchlab.errors import ConfigError, check
from batchlab.files import jsonable
from batchlab.runs import run_dir

# What a run leaves in its folder; any of them there means the folder is taken.
RUN_MARKERS = ("config.yaml", "summary.json", "hparams.yaml", "tune.json", "metrics.csv", "checkpoints")
# ckpt_path values that Lightning resolves itself rather than reading a file.
CKPT_WORDS = ("last", "best", "hpc")
# What the Trainer reads first from any checkpoint.
LIGHTNING_KEYS = ("pytorch-lightning_version", "state_dict")
GIVE_A_CHECKPOINT = "give the path of a checkpoint a fit saved (runs/NAME/version_N/checkpoints/*.ckpt)"


def check_config_files(args: Sequence[str]) -> None:
    """Refuse a config file given with ``-c``/``--config`` that is missing or not YAML, naming it and where it
    breaks."""
    for path in config_values(args):
        # jsonargparse also takes the configuration itself (-c '{trainer: {max_epochs: 1}}'); as a path, one
        # longer than a file name may be would fail the checks below.
        if inline_config(path) is not None:
            continue
        if not Path(path).is_file():
            problem = "it is a folder, not a file" if Path(path).is_dir() else "there is no such file"
            raise ConfigError(
                f"config={path!r} is not allowed: {problem}; pass the path of a YAML file (e.g. configs/seed.yaml)"
            )
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config={path!r} is not allowed: it is not valid YAML{where} ({problem})") from None


def check_run(trainer: Trainer) -> None:
    """Raise ``ConfigError`` for a setting or a path that would fail, or write over a run, once the run starts."""
    check_trainer_settings(trainer)
    # Only global rank 0 writes the run folder. Another rank must not look: under DDP it starts after rank 0 has
    # created the folder and would find it taken.
    if trainer.is_global_zero:
        check_run_folder(trainer)


def check_data(datamodule: Any, trainer: Trainer, subcommand: Optional[str]) -> None:
    """Raise ``ConfigError`` where the data as configured gives the command nothing to run on: no training batch
    on this trainer's devices for ``fit`` and ``tune`` (a study sets its own batch sizes, within the training
    split), no test split for ``test``, no validation split for ``validate``."""
    if not isinstance(datamodule, ToyRegressionData):
        return
    if subcommand in ("fit", "tune"):
        datamodule.check_training_batches(trainer.world_size)
    elif subcommand == "test":
        datamodule.check_test_split()
    elif subcommand == "validate":  # Lightning would skip the empty loop and exit 0, having validated nothing
        datamodule.check_val_split()


def check_callbacks(model: Any, datamodule: Any, trainer: Trainer, subcommand: Optional[str]) -> None:
    """Raise ``ConfigError`` where batchlab's noise-scale monitor or batch-size warmup cannot run this ``fit`` as
    configured (the callbacks check it again when the fit starts, too late to leave nothing written)."""
    from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr

    from batchlab.callbacks import BatchSizeWarmup, NoiseScaleMonitor

    ours = [c for c in trainer.callbacks if isinstance(c, (NoiseScaleMonitor, BatchSizeWarmup))]
    if subcommand != "fit" or not ours:
        return
    configured = model.configure_optimizers()  # the optimizers the fit will build, for what they can hold
    optimizers = [o for o in _optimizers(configured) if isinstance(o, torch.optim.Optimizer)]
    size = getattr(datamodule, "batch_size", None)
    if size is None and lightning_hasattr(model, "batch_size"):
        size = lightning_getattr(model, "batch_size")
    for c in ours:
        if isinstance(c, NoiseScaleMonitor):
            c.check_fit(trainer, model, optimizers)
        else:
            c.check_fit(trainer, optimizers, size if isinstance(size, int) else None)


def _optimizers(configured: Any) -> list[Any]:
    """The optimizers in whatever ``configure_optimizers`` returned (one, a list or tuple, a dict or dicts)."""
    if isinstance(configured, dict):
        return [configured.get("optimizer")]
    if isinstance(configured, (list, tuple)):
        out = []
        for item in configured:
            out += _optimizers(item) if isinstance(item, (dict, list, tuple)) else [item]
        return out
    return [configured]


def check_trainer_settings(trainer: Trainer) -> None:
    for name in ("accumulate_grad_batches", "log_every_n_steps"):
        value = getattr(trainer, name)
        check(value >= 1, f"trainer.{name}={value!r} is not allowed: use a positive integer (1, 2, 3, ...)")
    every = trainer.check_val_every_n_epoch
    check(
        every is None or every >= 1,
        f"trainer.check_val_every_n_epoch={every!r} is not allowed: use a positive integer, or null",
    )
    clip = trainer.gradient_clip_val
    check(
        clip is None or (math.isfinite(clip) and clip >= 0),
        f"trainer.gradient_clip_val={clip if clip is None else format(clip, 'g')} is not allowed: use a finite number >= 0 (0 or null: no clipping)",
    )


def check_checkpoint(ckpt_path: Any, subcommand: Optional[str] = None) -> None:
    """Refuse a ``ckpt_path`` that Lightning could not use: missing, not a file ``torch.save`` wrote, a torch file
    that is not a Lightning checkpoint, one holding objects that torch's weights-only loader refuses (LightningCLI
    reads a checkpoint's hyperparameters with it, whatever ``--weights_only`` says), or, to resume a fit, one that
    holds the weights alone. Loads it once, as LightningCLI does."""
    path = str(ckpt_path)
    if path in CKPT_WORDS or path.startswith("registry") or "://" in path:
        return
    name = f"ckpt_path={path!r} is not allowed"
    check(Path(path).exists(), f"{name}: there is no such file; {GIVE_A_CHECKPOINT}")
    if Path(path).is_dir():
        # A sharded checkpoint (torch.distributed.checkpoint's .metadata, or Lightning's DeepSpeed and FSDP layouts)
        # is a folder that Lightning reads itself; any other folder is a slip for a file inside it.
        if any((Path(path) / marker).exists() for marker in (".metadata", "meta.pt", "latest", "checkpoint")):
            return
        inside = sorted(p.name for p in Path(path).glob("*.ckpt"))
        hint = f" (it holds {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''})" if inside else ""
        raise ConfigError(f"{name}: it is a folder, not a checkpoint{hint}; {GIVE_A_CHECKPOINT}")
    # torch.save writes a zip archive holding a data.pkl.
    check(zipfile.is_zipfile(path), f"{name}: it is not a checkpoint (not a file torch.save wrote); "
                                    f"{GIVE_A_CHECKPOINT}")
    with zipfile.ZipFile(path) as archive:
        pickled = any(n.rsplit("/", 1)[-1] == "data.pkl" for n in archive.namelist())
    check(pickled, f"{name}: it is a zip archive that torch.save did not write (no data.pkl in it); "
                   f"{GIVE_A_CHECKPOINT}")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError:
        unsafe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
        named = f" ({', '.join(unsafe(path))})" if unsafe else ""
        raise ConfigError(
            f"{name}: it holds pickled objects{named} that torch's weights-only loader refuses, and LightningCLI "
            f"reads a checkpoint with it; {GIVE_A_CHECKPOINT}"
        ) from None
    except RuntimeError as err:
        raise ConfigError(f"{name}: torch cannot load it ({str(err).splitlines()[0]}); {GIVE_A_CHECKPOINT}") from None
    missing = [k for k in LIGHTNING_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise ConfigError(
            f"{name}: it is a torch file but not a Lightning checkpoint (no {' or '.join(map(repr, missing))}; "
            f"{_contents(checkpoint)}); {GIVE_A_CHECKPOINT}"
        )
    check(
        subcommand != "fit" or "optimizer_states" in checkpoint,
        f"{name}: it holds the weights alone (ModelCheckpoint's save_weights_only), and a fit resumes from a full "
        "checkpoint; give one saved without save_weights_only, or leave out --ckpt_path to start a new fit",
    )


def _contents(loaded: Any) -> str:
    if not isinstance(loaded, dict):
        return f"it holds a {type(loaded).__name__}"
    keys = ", ".join(map(repr, list(loaded)[:4]))
    return f"its keys are {keys}{', ...' if len(loaded) > 4 else ''}" if loaded else "it is an empty dict"


def replaced_by_checkpoint(given: dict[str, str], before: Any, after: Any) -> Optional[str]:
    """What LightningCLI replaced of the model's settings the user gave (``given``: each with where it was given,
    ``batchlab.arguments.given_settings``) by a checkpoint's hyperparameters, as one line; None if nothing.
    ``before`` and ``after`` are the model's configuration before and after it did."""
    was, now = _model_settings(before), _model_settings(after)
    changed = [k for k in given if k in now and jsonable(was.get(k)) != jsonable(now[k])]
    if not changed:
        return None
    said = ", ".join(
        f"{given[k]} {_shown(was.get(k))}" if given[k].startswith("--")
        else f"model.{k} {_shown(was.get(k))} (in {given[k]})"
        for k in changed
    )
    found = ", ".join(f"{k}={_shown(now[k])}" for k in changed)
    verb = "is" if len(changed) == 1 else "are"
    return f"{said} {verb} replaced by the checkpoint's {found} (LightningCLI restores a checkpoint's hyperparameters)"


def _model_settings(config: Any) -> dict[str, Any]:
    settings = config.as_dict() if hasattr(config, "as_dict") else dict(config or {})
    return {"class_path": settings.get("class_path"), **(settings.get("init_args") or {}),
            **(settings.get("dict_kwargs") or {})}


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(jsonable(value))


def check_run_folder(trainer: Trainer) -> None:
    folder, setting = Path(run_dir(trainer) or "."), _folder_setting(trainer)
    places = [(folder, setting)] + [
        (Path(cb.dirpath), f"ModelCheckpoint dirpath={str(cb.dirpath)!r}")
        for cb in trainer.checkpoint_callbacks
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None
    ]
    for path, name in places:
        reason = unwritable(path)
        check(reason is None, f"{name} is not allowed: {reason}; use a folder you can write to")
    taken = earlier_run(folder)
    check(not taken, f"{_taken_setting(trainer)} is not allowed: {folder} already holds a run ({', '.join(taken)}) "
                     f"and batchlab never writes over one; {_taken_advice(trainer)}")


def unwritable(path: Path) -> Optional[str]:
    """Why a run could not create or write into the folder ``path``, or None if it can."""
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def earlier_run(folder: Path) -> list[str]:
    """What an earlier run left in ``folder`` (empty if nothing)."""
    if not folder.is_dir():
        return []
    names = os.listdir(folder)
    found = sorted(n for n in names if n in RUN_MARKERS)
    if any(n.startswith("events.out.tfevents.") for n in names):
        found.append("TensorBoard events")
    return found


def _folder_setting(trainer: Trainer) -> str:
    if not trainer.loggers:
        return f"trainer.default_root_dir={trainer.default_root_dir!r}"
    return f"trainer.logger.init_args.save_dir={trainer.loggers[0].save_dir!r}"


def _taken_setting(trainer: Trainer) -> str:
    if not trainer.loggers:
        return f"trainer.default_root_dir={trainer.default_root_dir!r} with no logger"
    logger = trainer.loggers[0]
    version = getattr(logger, "version", None)
    return f"trainer.logger.init_args.version={version!r}" if version is not None else _folder_setting(trainer)


def _taken_advice(trainer: Trainer) -> str:
    if not trainer.loggers:
        return "give a new --trainer.default_root_dir, or a logger (each run then gets a new version_N folder)"
    if getattr(trainer.loggers[0], "version", None) is not None:
        return "leave the version unset for a new version_N folder, or give an unused one"
    return "give the logger a new folder"
