"""The study's folder, which makes a study resumable: its fingerprint (``study.json``: the settings, the
configuration and the machine) and one JSON file per finished measurement, each written at once, atomically.
Rerunning the same command reads what is there and measures only the rest; a folder made with another
configuration is refused and kept as it is.

    folder = StudyFolder.open(out, fingerprint, fresh, ranks)
    trial = folder.measured("trials/bs8-lr0.001", run_trial, Trial.from_json)

Under DDP rank 0 alone reads and writes it (``batchlab.study.ranks``); every rank gets what rank 0 found.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from batchlab.errors import ConfigError
from batchlab.files import jsonable, write_atomically
from batchlab.study.ranks import Ranks
from batchlab.study.results import FORMAT

T = TypeVar("T")


@dataclass
class Spent:
    """What one measurement cost when it was made: its fits, their optimizer steps and training samples, and its
    seconds. Kept in the measurement's own file (``_cost``), so that a resumed study still knows it."""

    fits: int = 0
    steps: int = 0
    samples: int = 0
    wall_s: float = 0.0


class StudyFolder:
    """An open study folder; ``open`` makes one.

    Args:
        root: The folder.
        ranks: The ranks of the study (rank 0 reads and writes).
    """

    def __init__(self, root: Path, ranks: Ranks) -> None:
        self.root, self.ranks = root, ranks
        # The running totals of fits, steps and samples (``Fitter``'s), read before and after a measurement.
        self.meter: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)
        self.spent: dict[str, Spent] = {}  # every measurement this study used, by key

    @classmethod
    def open(cls, out: str, fingerprint: dict[str, Any], fresh: bool, ranks: Ranks) -> StudyFolder:
        """Rank 0 opens the folder ``out`` (or, with ``fresh``, a new one beside it) or refuses it; the other
        ranks learn where it is, or the refusal."""
        return cls(Path(ranks.decide(lambda: str(_open(out, fingerprint, fresh)))), ranks)

    def measured(self, key: str, measure: Callable[[], Any], load: Callable[[dict[str, Any]], T]) -> T:
        """The measurement stored under ``key``, or ``measure()`` run now (on every rank) and stored; ``load``
        makes it a result again."""
        cached = self.ranks.decide(lambda: _read(self.root, key))
        if cached is None:
            before, start = self.meter(), time.perf_counter()
            # As stored (non-finite numbers as null), so that a resumed study computes from the same values.
            cached = jsonable(measure())
            fits, steps, samples = (b - a for a, b in zip(before, self.meter()))
            cached["_cost"] = jsonable(Spent(fits, steps, samples, time.perf_counter() - start))
            cached = self.ranks.shared(cached)
            self.ranks.decide(lambda: _write(self.root, key, cached))
        cached = dict(cached)
        self.spent[key] = Spent(**cached.pop("_cost"))
        return load(cached)


def _open(out: str, fingerprint: dict[str, Any], fresh: bool) -> Path:
    root = Path(out)
    if fresh and root.exists():
        k = 2
        while Path(f"{out}-{k}").exists():
            k += 1
        root = Path(f"{out}-{k}")
    saved = _read(root, "study")
    if saved is not None:
        measured = any(p.name != "study.json" for p in root.iterdir())
        if saved.get("format") != FORMAT and measured:
            raise ConfigError(
                f"{root} holds a study made by an older batchlab (folder format {saved.get('format', 1)}, this one "
                f"reads {FORMAT}); it is kept as it is: use --fresh true for a new folder beside it, or --out "
                "NEW_FOLDER"
            )
        if saved != jsonable(fingerprint) and measured:
            changed = sorted(_diff(saved, jsonable(fingerprint)))
            raise ConfigError(
                f"{root} holds a study made with a different configuration (changed: {', '.join(changed)}); "
                f"it is kept as it is: use --out NEW_FOLDER, or --fresh true for a new folder beside it"
            )
    elif root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} exists and is not a batchlab study: choose another --out")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the study folder {root}: {err.strerror}") from err
    _write(root, "study", fingerprint)  # unchanged, or a folder that holds no measurement yet
    return root


def _read(root: Path, key: str) -> Optional[dict[str, Any]]:
    path = root / f"{key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _write(root: Path, key: str, data: Any) -> None:
    path = root / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(jsonable(data), indent=1, allow_nan=False) + "\n")


def _diff(a: Any, b: Any, prefix: str = "") -> set[str]:
    """The keys, dotted, at which two nested mappings differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}
