"""HIP status codes and the exception that carries them.

``hipError_t`` keeps HIP's numeric values (``hip/hip_runtime_api.h``), so a code printed by
hipipc means the same thing as one printed by a HIP program.  Every failing hip* call raises
:class:`HipError`; its ``.code`` is the ``hipError_t`` a C program would have been returned.
"""

from __future__ import annotations

import enum
import math
import numbers
import operator
from typing import Any

__all__ = ["hipError_t", "HipError", "hipGetErrorName", "hipGetErrorString"]


class hipError_t(enum.IntEnum):
    """HIP's status codes, with HIP's values.  Aliases keep HIP's older spellings.

    Each member is also a module-level name (``hipipc.hipErrorNotReady``), as in HIP's header.
    400 is ``hipErrorInvalidHandle``, the name HIP's header and ``hipGetErrorName`` give it;
    ``hipErrorInvalidResourceHandle`` (CUDA's spelling, deprecated in HIP) is an alias of the
    same member, so ``.name``, ``repr`` and every message say ``hipErrorInvalidHandle``.
    """

    hipSuccess = 0
    hipErrorInvalidValue = 1
    hipErrorOutOfMemory = 2
    hipErrorNotInitialized = 3
    hipErrorDeinitialized = 4
    hipErrorInvalidConfiguration = 9
    hipErrorInvalidDevicePointer = 17
    hipErrorInvalidMemcpyDirection = 21
    hipErrorNoDevice = 100
    hipErrorInvalidDevice = 101
    hipErrorInvalidContext = 201
    hipErrorMapFailed = 205
    hipErrorUnmapFailed = 206
    hipErrorAlreadyMapped = 208
    hipErrorNotMapped = 211
    hipErrorOperatingSystem = 304
    hipErrorInvalidHandle = 400
    hipErrorIllegalState = 401
    hipErrorNotFound = 500
    hipErrorNotReady = 600
    hipErrorIllegalAddress = 700
    hipErrorLaunchOutOfResources = 701
    hipErrorLaunchTimeOut = 702
    hipErrorPeerAccessAlreadyEnabled = 704
    hipErrorPeerAccessNotEnabled = 705
    hipErrorContextIsDestroyed = 709
    hipErrorHostMemoryAlreadyRegistered = 712
    hipErrorHostMemoryNotRegistered = 713
    hipErrorLaunchFailure = 719
    hipErrorNotSupported = 801
    hipErrorUnknown = 999

    # HIP keeps these older names as aliases of the same values.
    hipErrorMemoryAllocation = 2
    hipErrorInvalidResourceHandle = 400


# Every code as a module-level name, as HIP's header has them (aliases included).
hipSuccess = hipError_t.hipSuccess
hipErrorInvalidValue = hipError_t.hipErrorInvalidValue
hipErrorOutOfMemory = hipError_t.hipErrorOutOfMemory
hipErrorNotInitialized = hipError_t.hipErrorNotInitialized
hipErrorDeinitialized = hipError_t.hipErrorDeinitialized
hipErrorInvalidConfiguration = hipError_t.hipErrorInvalidConfiguration
hipErrorInvalidDevicePointer = hipError_t.hipErrorInvalidDevicePointer
hipErrorInvalidMemcpyDirection = hipError_t.hipErrorInvalidMemcpyDirection
hipErrorNoDevice = hipError_t.hipErrorNoDevice
hipErrorInvalidDevice = hipError_t.hipErrorInvalidDevice
hipErrorInvalidContext = hipError_t.hipErrorInvalidContext
hipErrorMapFailed = hipError_t.hipErrorMapFailed
hipErrorUnmapFailed = hipError_t.hipErrorUnmapFailed
hipErrorAlreadyMapped = hipError_t.hipErrorAlreadyMapped
hipErrorNotMapped = hipError_t.hipErrorNotMapped
hipErrorOperatingSystem = hipError_t.hipErrorOperatingSystem
hipErrorInvalidHandle = hipError_t.hipErrorInvalidHandle
hipErrorIllegalState = hipError_t.hipErrorIllegalState
hipErrorNotFound = hipError_t.hipErrorNotFound
hipErrorNotReady = hipError_t.hipErrorNotReady
hipErrorIllegalAddress = hipError_t.hipErrorIllegalAddress
hipErrorLaunchOutOfResources = hipError_t.hipErrorLaunchOutOfResources
hipErrorLaunchTimeOut = hipError_t.hipErrorLaunchTimeOut
hipErrorContextIsDestroyed = hipError_t.hipErrorContextIsDestroyed
hipErrorLaunchFailure = hipError_t.hipErrorLaunchFailure
hipErrorNotSupported = hipError_t.hipErrorNotSupported
hipErrorUnknown = hipError_t.hipErrorUnknown
hipErrorPeerAccessAlreadyEnabled = hipError_t.hipErrorPeerAccessAlreadyEnabled
hipErrorPeerAccessNotEnabled = hipError_t.hipErrorPeerAccessNotEnabled
hipErrorHostMemoryAlreadyRegistered = hipError_t.hipErrorHostMemoryAlreadyRegistered
hipErrorHostMemoryNotRegistered = hipError_t.hipErrorHostMemoryNotRegistered
hipErrorMemoryAllocation = hipError_t.hipErrorMemoryAllocation
hipErrorInvalidResourceHandle = hipError_t.hipErrorInvalidResourceHandle

__all__ += [
    "hipErrorPeerAccessAlreadyEnabled",
    "hipErrorPeerAccessNotEnabled",
    "hipErrorHostMemoryAlreadyRegistered",
    "hipErrorHostMemoryNotRegistered",
    "hipSuccess",
    "hipErrorInvalidValue",
    "hipErrorOutOfMemory",
    "hipErrorNotInitialized",
    "hipErrorDeinitialized",
    "hipErrorInvalidConfiguration",
    "hipErrorInvalidDevicePointer",
    "hipErrorInvalidMemcpyDirection",
    "hipErrorNoDevice",
    "hipErrorInvalidDevice",
    "hipErrorInvalidContext",
    "hipErrorMapFailed",
    "hipErrorUnmapFailed",
    "hipErrorAlreadyMapped",
    "hipErrorNotMapped",
    "hipErrorOperatingSystem",
    "hipErrorInvalidHandle",
    "hipErrorIllegalState",
    "hipErrorNotFound",
    "hipErrorNotReady",
    "hipErrorIllegalAddress",
    "hipErrorLaunchOutOfResources",
    "hipErrorLaunchTimeOut",
    "hipErrorContextIsDestroyed",
    "hipErrorLaunchFailure",
    "hipErrorNotSupported",
    "hipErrorUnknown",
    "hipErrorMemoryAllocation",
    "hipErrorInvalidResourceHandle",
]

_STRINGS = {
    hipError_t.hipSuccess: "no error",
    hipError_t.hipErrorInvalidValue: "invalid argument",
    hipError_t.hipErrorOutOfMemory: "out of memory",
    hipError_t.hipErrorNotInitialized: "initialization error",
    hipError_t.hipErrorDeinitialized: "driver shutting down",
    hipError_t.hipErrorInvalidConfiguration: "invalid configuration argument",
    hipError_t.hipErrorInvalidDevicePointer: "invalid device pointer",
    hipError_t.hipErrorInvalidMemcpyDirection: "invalid copy direction",
    hipError_t.hipErrorNoDevice: "no device is detected",
    hipError_t.hipErrorInvalidDevice: "invalid device ordinal",
    hipError_t.hipErrorInvalidContext: "invalid device context",
    hipError_t.hipErrorMapFailed: "mapping of buffer object failed",
    hipError_t.hipErrorUnmapFailed: "unmapping of buffer object failed",
    hipError_t.hipErrorAlreadyMapped: "resource already mapped",
    hipError_t.hipErrorNotMapped: "resource not mapped",
    hipError_t.hipErrorOperatingSystem: "OS call failed or operation not supported on this OS",
    hipError_t.hipErrorInvalidHandle: "invalid resource handle",
    hipError_t.hipErrorIllegalState: "the operation cannot be performed in the present state",
    hipError_t.hipErrorNotFound: "named symbol not found",
    hipError_t.hipErrorNotReady: "device not ready",
    hipError_t.hipErrorIllegalAddress: "an illegal memory access was encountered",
    hipError_t.hipErrorLaunchOutOfResources: "too many resources requested for launch",
    hipError_t.hipErrorLaunchTimeOut: "the launch timed out and was terminated",
    hipError_t.hipErrorPeerAccessAlreadyEnabled: "peer access is already enabled",
    hipError_t.hipErrorPeerAccessNotEnabled: "peer access has not been enabled",
    hipError_t.hipErrorContextIsDestroyed: "context is destroyed",
    hipError_t.hipErrorHostMemoryAlreadyRegistered: (
        "part or all of the requested memory range is already mapped"
    ),
    hipError_t.hipErrorHostMemoryNotRegistered: (
        "pointer does not correspond to a registered memory region"
    ),
    hipError_t.hipErrorLaunchFailure: "unspecified launch failure",
    hipError_t.hipErrorNotSupported: "operation not supported",
    hipError_t.hipErrorUnknown: "unknown error",
}


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` in at most ``limit`` characters, for messages that show an argument.

    Arguments may be huge (a buffer passed where a pointer belongs) or hostile (a ``__repr__``
    that raises), so no message embeds more than ``limit`` characters of one.
    """
    if isinstance(value, (str, bytes, bytearray)) and len(value) > limit:
        value = value[:limit]  # do not build the repr of a huge string only to cut it
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_code(code: Any) -> hipError_t:
    """``code`` as a ``hipError_t``; ``hipErrorUnknown`` for any number HIP does not define
    (huge, negative, fractional, inf, nan), as HIP answers for unknown codes.  Raises
    ``TypeError`` for what is no number at all (a string, None)."""
    if isinstance(code, hipError_t):
        return code
    try:
        value = operator.index(code)
    except TypeError:
        if not isinstance(code, numbers.Real):
            raise TypeError(f"a hipError_t code is an int, not {type(code).__name__}") from None
        # A float code: only a finite whole number names a code (int(inf) would overflow).
        real = float(code)
        value = int(real) if math.isfinite(real) and real.is_integer() else -1
    return _BY_VALUE.get(value, hipError_t.hipErrorUnknown)


_BY_VALUE = {int(member): member for member in hipError_t}


def _code_argument(code: object) -> hipError_t:
    """A status code given by the caller: any integer (numpy integers too), never a bool."""
    try:
        if isinstance(code, bool):
            raise TypeError
        value = operator.index(code)  # type: ignore[arg-type]
    except TypeError:
        raise HipError(
            hipError_t.hipErrorInvalidValue,
            f"a hipError_t must be an integer, not {type(code).__name__}",
        ) from None
    return _as_code(value)


def hipGetErrorName(code: int) -> str:
    """Return HIP's name for ``code`` (``"hipErrorUnknown"`` for a value HIP does not define).

    Raises ``hipErrorInvalidValue`` for a ``code`` that is not an integer (or is a bool).
    """
    return _code_argument(code).name


def hipGetErrorString(code: int) -> str:
    """Return HIP's description of ``code`` (``"unknown error"`` for an undefined value).

    Raises ``hipErrorInvalidValue`` for a ``code`` that is not an integer (or is a bool).
    """
    return _STRINGS[_code_argument(code)]


class HipError(RuntimeError):
    """A failed hip* call.

    ``code`` is the :class:`hipError_t` a HIP program would have received; ``detail`` says what
    went wrong in this call and, where the context is known, how to fix it.  Instances pickle
    with their code and detail, so they cross process boundaries (``multiprocessing`` results).
    """

    def __init__(self, code: int, detail: str = "") -> None:
        self.code = _as_code(code)
        self.detail = detail
        text = f"{self.code.name} ({int(self.code)}): {_STRINGS[self.code]}"
        super().__init__(f"{text}: {detail}" if detail else text)

    def __reduce__(self) -> tuple[type[HipError], tuple[int, str]]:
        return (type(self), (int(self.code), self.detail))
