"""The command line as batchlab amends it before LightningCLI parses it, so that a short command does what a
newcomer means; and which model settings the user gave, for the note when a checkpoint replaces them.

- Switches: ``batchlab study --quick`` reads as ``--quick true`` (jsonargparse's booleans want a value);
  ``--verbose`` is read here too, before the parser, since it decides what Lightning may say while parsing.
- Default configs: with no ``-c`` at all, ``fit``, ``validate``, ``test``, ``predict`` and ``tune`` run the seed
  experiment (``configs/seed.yaml``) and ``study`` the default study (``configs/study.yaml``), as if it had been
  given first. They ship inside the package as ``batchlab.configs``: a pip-installed batchlab needs no checkout. A
  ``-c`` of the user's is used as given, without them.
- Default classes: batchlab's model and data, wherever neither the flags nor a config name others.

Neither is a parser default: jsonargparse carries a default class's ``init_args`` over to a class the user names in
its place when they share a name (a user's ``lr`` or ``batch_size`` would silently take batchlab's values). So a
default config leaves out its section for a class the user names, and a default class is named on the command
line only where nothing names one.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# Switches that read as plain flags; jsonargparse's booleans want a value.
SWITCHES = {"--quick", "--fresh", "--verbose"}
DEFAULT_CLASSES = {"model": "batchlab.model.MLPRegressor", "data": "batchlab.data.ToyRegressionData"}
# The configuration a subcommand takes when the user gives none.
DEFAULT_CONFIGS = {"study": "study.yaml"}
SEED_CONFIG = "seed.yaml"


def expand_switches(args: list[str]) -> list[str]:
    """``args`` with ``true`` after each switch given without a value."""
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        # Only where no value follows: ``--quick maybe`` must reach the parser, which refuses it in one line.
        following = args[i + 1] if i + 1 < len(args) else None
        if arg in SWITCHES and (following is None or following.startswith("-")):
            out.append("true")
    return out


def verbose_flag(args: Sequence[str]) -> bool:
    """Whether ``--verbose`` is on (the last one given; the parser checks its value)."""
    verbose = False
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name == "--verbose":
            given = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            verbose = given.lower() in ("true", "yes", "1")
    return verbose


def amend(args: list[str], subcommands: Collection[str]) -> list[str]:
    """``args`` with the default config and the default classes, where they apply (see the module's docstring),
    right after the subcommand, so that everything the user gave overrides them."""
    at = _subcommand_at(args, subcommands)
    if at is None:
        return args
    tail = args[at + 1 :]
    named = {key for key in DEFAULT_CLASSES if any(_names_class(arg, key) for arg in tail)}
    default = []
    if not list(config_values(args)):
        config = {k: v for k, v in default_config(args[at]).items() if k not in named}
        default = [f"--config={json.dumps(config)}"]  # inline: nothing is written, and no path is resolved
        configs = [config]
    else:
        configs = [config for _, config in _configs(tail)]
    for config in configs:
        named |= {key for key in DEFAULT_CLASSES if _config_names_class(config.get(key))}
    classes = [x for key, path in DEFAULT_CLASSES.items() if key not in named for x in (f"--{key}.class_path", path)]
    return args[: at + 1] + default + classes + tail


def default_config(subcommand: str) -> dict[str, Any]:
    """The configuration ``subcommand`` takes when the user gives none."""
    name = DEFAULT_CONFIGS.get(subcommand, SEED_CONFIG)
    return yaml.safe_load(configs_folder().joinpath(name).read_text())


def configs_folder() -> Traversable:
    """batchlab's configs: the package's ``batchlab.configs``, or from a source tree (an editable install, or
    ``PYTHONPATH=src`` as in the tests) the tree's own ``configs/``, the folder that package is made from."""
    tree = Path(__file__).resolve().parents[2]
    # Not through the import system from a tree: under PYTHONPATH=src it has no batchlab.configs, and an editable
    # install of another checkout would supply that checkout's.
    if (tree / "pyproject.toml").is_file() and (tree / "configs" / SEED_CONFIG).is_file():
        return tree / "configs"
    return resources.files("batchlab.configs")


def config_values(args: Sequence[str]) -> Iterator[str]:
    """The values of every ``-c``/``--config`` in ``args``: paths, or configurations given inline."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            yield args[i + 1]
        elif arg.startswith("--config="):
            yield arg.split("=", 1)[1]


def inline_config(value: str) -> Optional[dict[str, Any]]:
    """``value`` as a configuration given inline (``-c '{trainer: {max_epochs: 1}}'``), or None if it is not one."""
    try:
        config = yaml.safe_load(value)
    except yaml.YAMLError:
        return None
    return config if isinstance(config, dict) else None


def given_settings(args: Sequence[str], subcommands: Collection[str]) -> dict[str, str]:
    """The model's settings given after the subcommand (``class_path`` among them), each with where it was given:
    its flag (``--model.lr``) or the config that holds it. A flag wins over a config, as in the parser."""
    at = _subcommand_at(list(args), subcommands)
    if at is None:
        return {}
    tail = list(args[at + 1 :])
    given: dict[str, str] = {}
    for where, config in _configs(tail):
        section = config.get("model")
        if isinstance(section, str):
            given["class_path"] = where
        elif isinstance(section, dict):
            init_args = section.get("init_args")
            names = [k for k in section if k not in ("init_args", "dict_kwargs")]
            given.update(dict.fromkeys([*names, *(init_args if isinstance(init_args, dict) else [])], where))
    for arg in tail:
        if _names_class(arg, "model"):
            given["class_path"] = arg.split("=", 1)[0]
        elif arg.startswith("--model."):
            name = arg[len("--model.") :].split("=", 1)[0].removeprefix("init_args.")
            given[name] = f"--model.{name}"
    return given


def _subcommand_at(args: list[str], subcommands: Collection[str]) -> Optional[int]:
    return next((i for i, a in enumerate(args) if a in subcommands), None)


def _names_class(arg: str, key: str) -> bool:
    return arg in (f"--{key}", f"--{key}.class_path") or arg.startswith((f"--{key}=", f"--{key}.class_path="))


def _config_names_class(section: Any) -> bool:
    return isinstance(section, str) or (isinstance(section, dict) and "class_path" in section)


def _configs(args: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each config in ``args`` that can be read, as (where it was given, its contents); the parser reports the
    others."""
    for value in config_values(args):
        config = inline_config(value)
        if config is not None:
            yield "an inline config", config
            continue
        try:
            config = yaml.safe_load(Path(value).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict):
            yield value, config
