"""``hipGetLastError`` / ``hipPeekAtLastError``: the last error a hip* call raised in this
thread.

HIP's rule (ROCm 6, as CUDA): the runtime remembers, per thread, the last error a call
returned; ``hipGetLastError`` returns it and resets it to ``hipSuccess``,
``hipPeekAtLastError`` returns it and leaves it.  Successful calls do not reset it.  In
hipipc a failing call raises :class:`HipError`, so the error is recorded in one place: the
package wraps every public ``hip*`` function once, when it is assembled
(:func:`record_errors`), and the wrapper notes the code of a ``HipError`` on its way out.
``hipErrorNotReady`` *returned* by ``hipEventQuery``/``hipStreamQuery`` is a result, not an
error, and is not recorded (CUDA does not record it either).
"""

from __future__ import annotations

import functools
import sys
import threading
import types
from collections.abc import Callable, MutableMapping
from typing import Any, TypeVar

from .errors import HipError, hipError_t

__all__ = ["hipGetLastError", "hipPeekAtLastError"]

_state = threading.local()
_F = TypeVar("_F", bound=Callable[..., Any])


def hipGetLastError() -> hipError_t:
    """The last error a hip* call raised in this thread, then ``hipSuccess`` until the next."""
    code = getattr(_state, "code", hipError_t.hipSuccess)
    _state.code = hipError_t.hipSuccess
    return code


def hipPeekAtLastError() -> hipError_t:
    """The last error a hip* call raised in this thread, left in place."""
    return getattr(_state, "code", hipError_t.hipSuccess)


def _recording(fn: _F) -> _F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HipError as exc:
            _state.code = exc.code
            raise

    wrapper.__hipipc_records_errors__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


_EXEMPT = {"hipGetLastError", "hipPeekAtLastError"}


def record_errors(namespace: MutableMapping[str, Any]) -> None:
    """Wrap every ``hip*`` function in ``namespace`` (the package's) so that the errors it
    raises are recorded, and put the same wrapper in the module that defines it, so that
    ``hipipc.hipX is hipipc.runtime.hipX`` and pickling by name still works.  Idempotent."""
    for name, fn in list(namespace.items()):
        if (
            not name.startswith("hip")
            or name in _EXEMPT
            or not isinstance(fn, types.FunctionType)
            or getattr(fn, "__hipipc_records_errors__", False)
        ):
            continue
        wrapped = _recording(fn)
        namespace[name] = wrapped
        home = sys.modules.get(fn.__module__)
        if home is not None and getattr(home, name, None) is fn:
            setattr(home, name, wrapped)
