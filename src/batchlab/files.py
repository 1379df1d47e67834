"""Writing results: every file batchlab writes goes through here, so that none is half-written or overwritten.

- ``write_atomically(path, text)`` replaces a file in one step: a reader, or a run interrupted mid-write, sees the
  old file or the new one, never a part.
- ``write_json(path, data)`` writes a new file and never replaces one: an existing ``tune.json`` makes the next
  ``tune-2.json``. Run results are a record.
- ``jsonable(data)`` is ``data`` as strict JSON allows it: non-finite numbers (an infinite noise scale, say)
  become null, dataclasses their fields. A field declared with ``metadata={"json_if": predicate}`` is written only
  where ``predicate(the dataclass)`` holds: a key that only some results have (a full study's fits, say).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step."""
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Replace ``path`` in one step with what ``write(tmp)`` writes to a temporary file beside it (a plot, say),
    keeping its suffix, which some writers read the format from."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` to ``path`` atomically; never replace an existing file (a ``-2``, ``-3``... name is used).

    Returns the path written.
    """
    path = Path(path)
    # A Trainer without a logger reports to its default_root_dir, which nothing may have made yet outside the CLI.
    path.parent.mkdir(parents=True, exist_ok=True)
    target, k = path, 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.stem}-{k}{path.suffix}")
    write_atomically(target, dumps(data))
    return target


def dumps(data: Any) -> str:
    """``data`` as indented strict JSON, one file's worth."""
    return json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n"


def jsonable(data: Any) -> Any:
    """``data`` as strict JSON allows it: non-finite floats become null, dataclasses dicts (less the fields whose
    ``json_if`` says they do not apply), tuples lists."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return jsonable({f.name: getattr(data, f.name) for f in dataclasses.fields(data)
                         if f.metadata.get("json_if", _always)(data)})
    if isinstance(data, dict):
        return {str(k): jsonable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [jsonable(v) for v in data]
    if data is None or isinstance(data, (str, int, bool)):
        return data
    return str(data)


def _always(data: Any) -> bool:
    return True
