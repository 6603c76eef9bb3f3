"""The 64-byte IPC handles: value types built from untrusted bytes.

Layout (little-endian, 64 bytes, the size of ``hipIpcMemHandle_t`` and ``cudaIpcMemHandle_t``)::

    0  magic     4s   b"HIPC"
    4  version   u8   1
    5  kind      u8   HandleKind
    6  reserved  u16  0
    8  secret    16s  128 bits from the OS CSPRNG, fresh per allocation or event
   24  size      u64  bytes of the allocation (memory) or of the event state (events)
   32  device    u32  device ordinal of the exporter
   36  uid       u32  the exporter's effective uid (selects its store, checked against the file)
   40  reserved  24s  zero

A handle names its store segment only through one-way digests of all 64 bytes
(:attr:`IpcHandle.segment_name`, :attr:`IpcHandle.verifier`), so a flip of any bit names
another (absent) segment, and no file name, log line or ``repr`` reveals the secret.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import operator
import secrets
import struct
from typing import Any

from .errors import HipError, hipError_t

__all__ = [
    "HANDLE_SIZE",
    "HandleKind",
    "IpcHandle",
    "IpcMemHandle",
    "IpcEventHandle",
]

HANDLE_SIZE = 64
_MAGIC = b"HIPC"
_VERSION = 1
_LAYOUT = struct.Struct("<4sBBH16sQII24s")
_ZERO_TAIL = bytes(24)
_SECRET_BYTES = 16
assert _LAYOUT.size == HANDLE_SIZE


class HandleKind(enum.IntEnum):
    """What a handle names; the backend that made it is part of the kind."""

    HOST_MEMORY = 1
    GPU_MEMORY = 2
    HOST_EVENT = 3
    GPU_EVENT = 4


def _invalid(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidValue, detail)


class IpcHandle:
    """Common base of :class:`IpcMemHandle` and :class:`IpcEventHandle`.

    Construct from any 64-byte bytes-like object; the bytes are validated as untrusted input and
    a malformed handle raises ``HipError(hipErrorInvalidValue)``.  Instances are immutable,
    compare and hash by value, pickle as their bytes, and never show the secret in ``repr``.
    """

    __slots__ = ("_data", "_kind", "_size", "_device", "_uid", "_name", "_verifier")
    _KINDS: dict[int, HandleKind] = {}  # value -> kind; a dict lookup is cheaper than Enum()

    def __init__(self, data: Any) -> None:
        if isinstance(data, IpcHandle):
            data = data._data
        if type(data) is bytes:
            raw = data
        else:
            try:
                raw = bytes(memoryview(data).cast("B"))
            except (TypeError, ValueError) as exc:
                raise _invalid(
                    f"{type(self).__name__} needs a 64-byte bytes-like object, "
                    f"not {type(data).__name__}"
                ) from exc
        if len(raw) != HANDLE_SIZE:
            raise _invalid(f"an IPC handle is {HANDLE_SIZE} bytes, got {len(raw)}")
        magic, version, kind_value, reserved, _secret, size, device, uid, tail = (
            _LAYOUT.unpack(raw)
        )
        if magic != _MAGIC:
            raise _invalid("not a hipipc handle (bad magic)")
        if version != _VERSION:
            raise _invalid(f"unsupported handle version {version} (this hipipc reads {_VERSION})")
        kind = self._KINDS.get(kind_value)
        if kind is None:
            raise _invalid(f"not a {type(self).__name__} (kind {kind_value})")
        if reserved != 0 or tail != _ZERO_TAIL:
            raise _invalid("reserved bytes of the handle are not zero")
        if size == 0:
            raise _invalid("handle names an empty allocation")
        self._data = raw
        self._kind = kind
        self._size = size
        self._device = device
        self._uid = uid
        self._name: str | None = None
        self._verifier: bytes | None = None

    # Read-only fields: the registry hands its own handle object to callers, and a field
    # rewritten in place would no longer match the bytes (and hash) it was parsed from.
    # attrgetter properties cost next to nothing on the open path.
    kind = property(operator.attrgetter("_kind"), doc="What the handle names (HandleKind).")
    size = property(operator.attrgetter("_size"), doc="Bytes of the allocation or event state.")
    device = property(operator.attrgetter("_device"), doc="The exporter's device ordinal.")
    uid = property(operator.attrgetter("_uid"), doc="The exporter's effective uid.")

    @classmethod
    def new(cls, kind: HandleKind, size: int, device: int, uid: int) -> IpcHandle:
        """A fresh handle with a new 128-bit secret (never reused).

        Raises ``HipError(hipErrorInvalidValue)`` when a field does not fit its slot (a size
        of 2**64 bytes or more, a negative or 32-bit-overflowing device or uid).
        """
        try:
            kind = HandleKind(kind)
        except (ValueError, TypeError):  # inf, nan, strings: no kind (int() would overflow)
            raise _invalid(f"{kind!r} is not a HandleKind") from None
        try:
            raw = _LAYOUT.pack(
                _MAGIC, _VERSION, int(kind), 0, secrets.token_bytes(_SECRET_BYTES),
                size, device, uid, _ZERO_TAIL,
            )
        except struct.error:
            raise _invalid(f"cannot describe size {size}, device {device}, uid {uid} in a "
                           "handle (64-bit size, 32-bit device and uid)") from None
        return cls(raw)

    @classmethod
    def coerce(cls, obj: Any) -> IpcHandle:
        """``obj`` if it already is one, else parse it as 64 raw bytes."""
        return obj if type(obj) is cls else cls(obj)

    def _derive(self) -> None:
        # One keyed hash gives both: its first 20 bytes name the segment, the other 32 verify
        # it.  Neither reveals the other nor the handle.
        digest = hashlib.blake2b(self._data, digest_size=52, person=b"hipipc.segment").digest()
        self._name = digest[:20].hex()
        self._verifier = digest[20:]

    @property
    def segment_name(self) -> str:
        """The store file name: a one-way digest of the whole handle."""
        if self._name is None:
            self._derive()
        return self._name  # type: ignore[return-value]

    @property
    def verifier(self) -> bytes:
        """The digest written in the segment header; compared in constant time on import."""
        if self._verifier is None:
            self._derive()
        return self._verifier  # type: ignore[return-value]

    @property
    def fingerprint(self) -> str:
        """A short, non-secret tag to tell handles apart in logs."""
        return hashlib.blake2b(self._data, digest_size=4, person=b"hipipc.fp").hexdigest()

    def __bytes__(self) -> bytes:
        return self._data

    def __len__(self) -> int:
        return HANDLE_SIZE

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IpcHandle):
            return NotImplemented
        return hmac.compare_digest(self._data, other._data)

    def __hash__(self) -> int:
        return hash(self.verifier)

    def __reduce__(self) -> tuple[type[IpcHandle], tuple[bytes]]:
        return (type(self), (self._data,))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind.name.lower()}, size={self.size}, "
            f"device={self.device}, uid={self.uid}, id={self.fingerprint})"
        )


class IpcMemHandle(IpcHandle):
    """A 64-byte handle to an exported allocation (``hipIpcMemHandle_t``)."""

    __slots__ = ()
    _KINDS = {k.value: k for k in (HandleKind.HOST_MEMORY, HandleKind.GPU_MEMORY)}


class IpcEventHandle(IpcHandle):
    """A 64-byte handle to an interprocess event (``hipIpcEventHandle_t``)."""

    __slots__ = ()
    _KINDS = {k.value: k for k in (HandleKind.HOST_EVENT, HandleKind.GPU_EVENT)}
