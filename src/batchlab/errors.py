"""Bad input: the types that say what a value may be, the one helper that checks values against them, and the
one line a bad value is reported in.

Options are declared once, in a constructor's or a dataclass's signature, with a type from here where a plain
``int`` or ``float`` allows too much (``batch_size: PositiveInt = 2``). From the command line jsonargparse checks
them while it parses; from Python, ``check_arguments`` checks them against the same types. What no type can say (a
low below a high, one setting against another) is a ``check(condition, message)``. Either way the failure is a
``ConfigError`` whose message names the bad value and what is allowed, and ``batchlab.cli.main`` prints it as one
line, ``batchlab: error: ...``, with exit status 2 and no traceback; ``one_line`` condenses jsonargparse's own
reports (several indented lines) into the same form.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml
from jsonargparse.typing import NonNegativeInt, PositiveInt, restricted_number_type

_INF = math.inf
# jsonargparse's float types take infinity and (PositiveFloat aside) NaN; these do not.
FiniteFloat = restricted_number_type("FiniteFloat", float, [(">", -_INF), ("<", _INF)])
PositiveFloat = restricted_number_type("PositiveFiniteFloat", float, [(">", 0), ("<", _INF)])
NonNegativeFloat = restricted_number_type("NonNegativeFiniteFloat", float, [(">=", 0), ("<", _INF)])
Fraction = restricted_number_type("Fraction", float, [(">=", 0), ("<", 1)])

# A parsed value keeps its restricted type where it moves on to an untyped place (jsonargparse carries a config's
# init_args over to another class given by class_path); YAML must still write it, as the number it is.
for _kind, _base in ((PositiveInt, int), (NonNegativeInt, int), (FiniteFloat, float), (PositiveFloat, float),
                     (NonNegativeFloat, float), (Fraction, float)):
    for _dumper in (yaml.SafeDumper, yaml.Dumper):
        yaml.add_representer(_kind, lambda dumper, value, base=_base: dumper.represent_data(base(value)), Dumper=_dumper)

__all__ = ["ConfigError", "Fraction", "FiniteFloat", "NonNegativeFloat", "NonNegativeInt", "PositiveFloat",
           "PositiveInt", "check", "check_arguments", "one_line"]

# What each type allows, in the words of an error message.
ALLOWED = {
    "PositiveInt": "a positive integer",
    "NonNegativeInt": "an integer >= 0",
    "FiniteFloat": "a finite number",
    "PositiveFiniteFloat": "a finite number > 0",
    "NonNegativeFiniteFloat": "a finite number >= 0",
    "Fraction": "a number in [0, 1)",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "list": "a list",
    "dict": "a mapping",
    "NoneType": "null",
}


class ConfigError(ValueError):
    """A user-given value is out of range, of the wrong shape or otherwise unusable. A ``ValueError``, so that code
    using batchlab as a library can catch it the usual way."""


def check(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def check_arguments(function: Any, values: Mapping[str, Any]) -> None:
    """Check each of ``values`` against the type ``function``'s signature (or a dataclass's fields) gives it, as
    jsonargparse does for the command line: restricted numbers, ``Literal`` choices, ``Optional`` and lists of
    them. Names ``function`` does not annotate are left alone."""
    hints = typing.get_type_hints(function)
    for name, value in values.items():
        if name in hints:
            allowed = _problem(hints[name], value)
            check(allowed is None, f"{name}={_shown(value)} is not allowed: use {allowed}")


def _problem(kind: Any, value: Any) -> Union[str, None]:
    """What ``kind`` allows, if ``value`` is not of it; None if it is (or ``kind`` is one this does not check)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:
        problems = [_problem(k, value) for k in args]
        return None if None in problems else " or ".join(p for p in problems if p)
    if kind is type(None):
        return None if value is None else "null"
    if origin is Literal:
        return None if value in args else "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, Sequence, tuple) and args:
        if not isinstance(value, (list, tuple)):
            return "a list"
        inner = [_problem(args[0], v) for v in value]
        return next((f"a list of {_plural(p)}" for p in inner if p), None)
    if kind is bool:  # a string "false" is truthy: only a bool is one
        return None if isinstance(value, bool) else ALLOWED["bool"]
    if kind in (int, float, str):
        numeric = {int: (int,), float: (int, float), str: ()}[kind]
        ok = isinstance(value, str) if kind is str else isinstance(value, numeric) and not isinstance(value, bool)
        return None if ok else ALLOWED[kind.__name__]
    name = getattr(kind, "__name__", "")
    if name in ALLOWED and isinstance(kind, type) and issubclass(kind, (int, float)) and kind not in (int, float, bool):
        integral = issubclass(kind, int)
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
            return ALLOWED[name]
        try:
            kind(value)
        except ValueError:
            return ALLOWED[name]
    return None


def _plural(allowed: str) -> str:
    """``a positive integer`` -> ``positive integers``."""
    words = allowed.split(" ", 1)[1] if allowed.startswith(("a ", "an ")) else allowed
    return re.sub(r"\b(integer|number|string|mapping|list)\b", r"\1s", words, count=1)


def _shown(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def one_line(err: BaseException, args: Sequence[str] = ()) -> str:
    """Condense an error message (jsonargparse's are several indented lines) into one readable line; a bad value
    given by a flag in ``args`` is quoted as typed there."""
    return _condense(str(err).strip(), args=args)


def _condense(text: str, prefix: str = "", args: Sequence[str] = ()) -> str:
    m = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    if not m:
        line = _flat(text)
        if "does not accept option" in line or "unrecognized arguments" in line:
            line += " (--help lists the accepted keys)"
        return line
    key, rest = prefix + m.group(1), m.group(2)
    if key == "config":
        return _flat(rest)
    # A class given by class_path: jsonargparse lists what failed for the class first, then for null.
    alternative = re.search(r"Errors:\n\s*- (.*)\n\s*- Expected a <class 'NoneType'>", rest, re.S)
    if alternative and re.match(r"Problem with given class_path|Import path", alternative.group(1)):
        inner = alternative.group(1)
        given = re.match(r"Problem with given class_path '([\w.]+)':\s*(.*)", inner, re.S)
        if not given:
            return f"{key}: {_flat(inner)}"
        class_path, problem = given.group(1), given.group(2).strip()
        if problem.startswith("Parser key"):
            return _condense(problem, key + ".", args)
        option = re.match(r"Option '(\w+)' is not accepted", problem)
        if option:
            return f"{key}.{option.group(1)} is not an option of {class_path} (--help lists the accepted keys)"
        return f"{key}.class_path={class_path!r} is not allowed: {_flat(problem)}"
    element = re.search(r"Not of type (\w+): (?:could not convert string to float: |invalid literal for int\(\) "
                        r"with base 10: )?'?(.*?)'?(?: does not conform.*| not an integer)?$", rest, re.M)
    if element and re.search(r"Given value type: <class '(list|tuple)'>|Subtypes: \[(list|tuple)\[", rest):
        # A list is reported by its bad element (x_range=[0, inf] as 'inf'), which says more than the list.
        return f"{key}={_shown_typed(element.group(2))} is not allowed: use {ALLOWED.get(element.group(1))}"
    value = re.search(r"(?:Given|Got) value: (.*)", rest)
    expected = []
    for name in re.findall(r"Expected a (<class '[\w.]+'>|typing\.Literal\[[^\]]*\])|Not of type (\w+)", rest):
        literal = re.match(r"typing\.Literal\[(.*)\]", name[0])
        type_name = name[1] or name[0][8:-2].rsplit(".", 1)[-1]
        expected.append("one of " + literal.group(1) if literal else ALLOWED.get(type_name, type_name))
    value = value or element  # a restricted type alone: "Not of type PositiveInt: 0 does not conform to ..."
    if value and expected:
        if value.group(1).strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            # jsonargparse refuses NaN and infinity as floats; say that it is the value, not its type.
            expected = ["a finite number" if e == "a number" else e for e in expected]
        allowed = " or ".join(dict.fromkeys(expected))
        value_text = value.group(2) if value is element else value.group(1)
        return f"{key}={_shown_typed(_as_typed(key, value_text.strip(), args))} is not allowed: use {allowed}"
    return f"{key}: {_flat(rest)}"


def _shown_typed(text: str) -> str:
    """A value as typed: a number bare (``batch_size=0``), anything else quoted (``batch_size='1e3'``)."""
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = text
    number = isinstance(parsed, (int, float)) and not isinstance(parsed, bool)
    return text if number or text.lower().lstrip("+-") in ("nan", "inf", "infinity") else repr(text)


def _as_typed(key: str, value: str, args: Sequence[str]) -> str:
    """``value`` as the user typed it where a flag for ``key`` gave it: jsonargparse reports the value it parsed
    (``1e3`` as 1000.0, ``true`` as True)."""
    head, _, tail = key.partition(".")
    flags = {f"--{key}", f"--{head}.init_args.{tail}"}
    typed = None
    for i, arg in enumerate(args):  # the last one given is the one parsed
        name, eq, rest = arg.partition("=")
        if name in flags:
            typed = rest if eq else (args[i + 1] if i + 1 < len(args) else None)
    if typed is None:
        return value
    # Only where the report is the typed value parsed: a list is reported by its bad element (x_range=[0, inf] as
    # 'inf', which says more), and a config file read after the flag may have given the value instead.
    parsed = {typed}
    for parse in (yaml.safe_load, float):
        try:
            parsed.add(str(parse(typed)))
        except (yaml.YAMLError, ValueError):
            pass
    return typed if value in parsed else value


def _flat(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
