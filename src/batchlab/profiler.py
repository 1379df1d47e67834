"""``NoProfiler``: Lightning's default "no profiling" with a cheaper per-hook cost (``configs/fast.yaml``).

Lightning wraps every hook call (each callback's and the module's, a few dozen per training step) in
``trainer.profiler.profile(name)``. Its default, ``PassThroughProfiler``, records nothing, but its ``profile`` is a
``contextlib.contextmanager`` generator, built, entered and closed at every call: about 2-3 us each on the 2-core VM,
several percent of a seed step. ``NoProfiler`` returns one shared do-nothing context instead. Any real profiler
(``--trainer.profiler simple``) replaces it as it would replace the default.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.profilers import PassThroughProfiler


class _NoOp:
    """A reusable context manager that does nothing (``contextlib.nullcontext`` without the per-use object)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


_NO_OP = _NoOp()


class NoProfiler(PassThroughProfiler):
    """Record nothing, as Lightning's default profiler, at the cost of one method call per profiled hook."""

    def profile(self, action_name: str) -> _NoOp:  # type: ignore[override]
        return _NO_OP
