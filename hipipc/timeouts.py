"""Timeouts: every ``timeout=`` of the package is checked here, once, the same way.

The rule: a timeout is ``None`` (no limit) or a real number of seconds ``>= 0``; ``inf`` and
any value at or past :data:`MAX_TIMEOUT` (1e9 s, 31 years; ``threading`` accepts at most
about 9.2e9 s) also mean no limit, so that no wait deeper down overflows (``OverflowError`` from
``threading``, ``select`` or a ``timespec``).  ``nan``, negative values, ``bool`` and
non-numbers raise ``HipError(hipErrorInvalidValue)`` naming the value.

A call that waits in several steps turns its timeout into one :func:`deadline` and gives each
step :func:`remaining` of it, so the timeout bounds the whole call, not each step.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from typing import Any, cast, overload

from .errors import HipError, hipError_t

__all__: list[str] = []  # internal: not part of the flat public namespace

# threading.TIMEOUT_MAX (about 9.2e9 s) is the largest wait threading accepts; deadlines
# built on it can still overflow an int64 of nanoseconds once "now" is added (socket
# timeouts, timespecs).  A billion seconds (31 years) is far below every such limit and far
# above any real wait, so longer timeouts mean "no limit", exactly like inf.
MAX_TIMEOUT = min(1e9, float(threading.TIMEOUT_MAX))


def check_timeout(timeout: Any, what: str = "timeout") -> float | None:
    """``timeout`` as seconds (a float in ``[0, MAX_TIMEOUT)``), or None for no limit.

    Raises ``HipError(hipErrorInvalidValue)`` for nan, negative values, bools and anything
    that is not a real number.
    """
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, numbers.Real)
        or type(timeout).__name__ == "bool_"
    ):  # numpy.bool_ is no number of seconds either
        raise HipError(
            hipError_t.hipErrorInvalidValue,
            f"{what} must be None or a number of seconds >= 0, not "
            f"{type(timeout).__name__} {timeout!r}",
        )
    try:
        seconds = float(timeout)
    except OverflowError:  # an int too large for a float: no limit, like inf
        # cast: numbers.Real's stubs declare no __gt__ (the value is an int or a Fraction).
        return None if cast(float, timeout) > 0 else _refuse(timeout, what)
    except (TypeError, ValueError):
        return _refuse(timeout, what)
    if math.isnan(seconds) or seconds < 0:
        return _refuse(timeout, what)
    return None if seconds >= MAX_TIMEOUT else seconds


def _refuse(timeout: Any, what: str) -> float | None:
    raise HipError(
        hipError_t.hipErrorInvalidValue,
        f"{what} must be None or a number of seconds >= 0 (inf: no limit), got {timeout!r}",
    )


def deadline(timeout: Any, what: str = "timeout") -> float | None:
    """The ``time.monotonic()`` instant a call with ``timeout`` must end by (None: never)."""
    seconds = check_timeout(timeout, what)
    return None if seconds is None else time.monotonic() + seconds


@overload
def remaining(end: None) -> None: ...
@overload
def remaining(end: float) -> float: ...
@overload
def remaining(end: float | None) -> float | None: ...


def remaining(end: float | None) -> float | None:
    """Seconds left until ``end`` (a :func:`deadline`), never negative; None for no limit."""
    if end is None:
        return None
    return min(max(0.0, end - time.monotonic()), MAX_TIMEOUT)


def expired(end: float | None) -> bool:
    """True once ``end`` (a :func:`deadline`) has passed."""
    return end is not None and time.monotonic() >= end
