"""The 64-byte IPC handles: value types built from untrusted bytes.

Layout (little-endian, 64 bytes, the size of ``hipIpcMemHandle_t`` and ``cudaIpcMemHandle_t``)::

    0  magic     4s   b"HIPC"
    4  version   u8   1
    5  kind      u8   HandleKind
    6  node      u16  the exporter's node tag (1..65535, see :func:`node_tag`)
    8  secret    16s  128 bits from the OS CSPRNG, fresh per allocation or event
   24  size      u64  bytes of the allocation (memory) or of the event state (events)
   32  device    u32  device ordinal of the exporter
   36  uid       u32  the exporter's effective uid (selects its store, checked against the file)
   40  route     24s  zero for the store transport; for the fd transport (``<IQIQ``) the
                      exporter's pid, its start time, its fd number of the memfd, the
                      memfd's inode (:class:`FdRoute`)

A handle names its store segment only through one-way digests of all 64 bytes
(:attr:`IpcHandle.segment_name`, :attr:`IpcHandle.verifier`), so a flip of any bit names
another (absent) segment, and no file name, log line or ``repr`` reveals the secret.

The node tag lets an importer refuse a handle made on another machine (or another simulated
node of :mod:`hipipc.mpi`) with a message that says so, before it looks in its store.  It is
16 bits: two real nodes share a tag with probability 1/65536, and then the importer's store
says the handle names nothing, as it did before tags existed.

The tail says how to open the handle (:attr:`IpcHandle.transport`): all zero, through the
exporter's store; otherwise it is an :class:`FdRoute` (:mod:`hipipc.fdtransport`), range
checked like every other field.  The importer needs no setting of its own.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import operator
import os
import secrets
import struct
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from .errors import HipError, hipError_t

__all__ = [
    "HANDLE_SIZE",
    "HandleKind",
    "IpcHandle",
    "IpcMemHandle",
    "IpcEventHandle",
    "FdRoute",
]

NODE_ENV = "HIPIPC_NODE_ID"

HANDLE_SIZE = 64
_MAGIC = b"HIPC"
_VERSION = 1
_LAYOUT = struct.Struct("<4sBBH16sQII24s")
_ZERO_TAIL = bytes(24)
_SECRET_BYTES = 16
_ROUTE = struct.Struct("<IQIQ")
_PID_MAX_LIMIT = 4194304  # the kernel's PID_MAX_LIMIT: no pid is larger
assert _ROUTE.size == len(_ZERO_TAIL)
_H = TypeVar("_H", bound="IpcHandle")
assert _LAYOUT.size == HANDLE_SIZE


class HandleKind(enum.IntEnum):
    """What a handle names; the backend that made it is part of the kind."""

    HOST_MEMORY = 1
    GPU_MEMORY = 2
    HOST_EVENT = 3
    GPU_EVENT = 4


def _invalid(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidValue, detail)


class FdRoute(NamedTuple):
    """Where an fd-transport handle's memory lives: the exporter (pid and start time, /proc
    stat field 22, so that a reused pid is refused), its descriptor number of the memfd, and
    the memfd's inode (a number reused for another file is refused before any read)."""

    pid: int
    start: int
    fd: int
    inode: int

    def pack(self) -> bytes:
        return _ROUTE.pack(*self)


def _parse_route(tail: bytes) -> FdRoute:
    """The :class:`FdRoute` in a non-zero tail; ``hipErrorInvalidValue`` if out of range."""
    route = FdRoute(*_ROUTE.unpack(tail))
    if not 1 <= route.pid <= _PID_MAX_LIMIT:
        problem = f"pid {route.pid} is not a process id"
    elif route.start <= 0:
        problem = "no exporter start time"
    elif route.fd >= 1 << 31:
        problem = f"descriptor {route.fd} is out of range"
    elif route.inode <= 0:
        problem = "no inode"
    else:
        return route
    raise _invalid(f"reserved bytes of the handle are not zero and not an fd route: {problem}")


def _machine_identity() -> bytes:
    """What tells this machine from the others: the kernel's boot id, else the host name.

    The boot id is per kernel, not per UTS namespace, so containers of one host that share
    /dev/shm under different host names still count as one node (their handles must open).
    """
    try:
        fd = os.open("/proc/sys/kernel/random/boot_id", os.O_RDONLY | os.O_CLOEXEC)
        try:
            boot_id = os.read(fd, 256).strip()  # a UUID and a newline: 37 bytes
        finally:
            os.close(fd)
        if boot_id:
            return b"boot:" + boot_id
    except OSError:
        pass
    return b"host:" + os.uname().nodename.encode()


def tag_of(identity: str | bytes) -> int:
    """The 16-bit node tag (1..65535) of a node identity string: a hash of it, never zero."""
    if isinstance(identity, str):
        identity = identity.encode()
    digest = hashlib.blake2b(identity, digest_size=4, person=b"hipipc.node").digest()
    return int.from_bytes(digest, "little") % 0xFFFF + 1


def machine_tag() -> int:
    """This machine's own tag, ignoring ``$HIPIPC_NODE_ID``."""
    return _MACHINE_TAG


# Computed once, at import (a read of /proc and a hash, a few microseconds), so that a
# process's first handle does not pay for it (issue 15's cold path): a machine's identity
# does not change under a running process.  ``$HIPIPC_NODE_ID`` is still read at first use.
_MACHINE_TAG = tag_of(_machine_identity())


def _tag_from_env() -> int:
    value = os.environ.get(NODE_ENV, "").strip()
    if not value:
        return machine_tag()
    try:
        number = int(value, 0)
    except ValueError:
        return tag_of(value)  # any other string names a node by its hash
    if not 1 <= number <= 0xFFFF:
        raise _invalid(
            f"${NODE_ENV}={value!r}: a number must be a node tag in 1..65535 "
            "(any other string is hashed to one)"
        )
    return number


_node_tag: int | None = None


def node_tag() -> int:
    """This process's node tag, written into every handle it makes and checked on import.

    Fixed at first use (the first handle made or opened) from ``$HIPIPC_NODE_ID``: a number
    1..65535 is the tag itself, any other string is hashed to one; unset, the machine's
    identity (the kernel boot id, else the host name) is.  Every process of one node must
    agree, so set the variable for a whole node or not at all; :class:`hipipc.mpi.NodeComm`
    sets it for simulated nodes.  A forked child inherits the parent's tag.
    """
    global _node_tag
    tag = _node_tag
    if tag is None:
        tag = _node_tag = _tag_from_env()
    return tag


def set_node_tag(tag: int) -> None:
    """Make ``tag`` (1..65535) this process's node tag and export it as ``$HIPIPC_NODE_ID``
    for child processes.  Raises ``hipErrorInvalidValue`` for a tag out of range, and
    ``hipErrorInvalidContext`` once this process already made or opened a handle under
    another tag (a node identity cannot change under live handles)."""
    global _node_tag
    if isinstance(tag, bool) or not isinstance(tag, int) or not 1 <= tag <= 0xFFFF:
        raise _invalid(f"a node tag is an integer in 1..65535, got {tag!r}")
    if _node_tag is not None and _node_tag != tag:
        raise HipError(
            hipError_t.hipErrorInvalidContext,
            f"this process already fixed its node tag ({_node_tag:#06x}, at its first "
            f"handle); choose the node ({NODE_ENV}, hipipc.mpi.NodeComm) before the "
            "first hipMalloc, IPC event or open",
        )
    os.environ[NODE_ENV] = str(tag)
    _node_tag = tag


class IpcHandle:
    """Common base of :class:`IpcMemHandle` and :class:`IpcEventHandle`.

    Construct from any 64-byte bytes-like object; the bytes are validated as untrusted input and
    a malformed handle raises ``HipError(hipErrorInvalidValue)``.  Instances are immutable,
    compare and hash by value, pickle as their bytes, and never show the secret in ``repr``.
    """

    __slots__ = (
        "_data",
        "_kind",
        "_size",
        "_device",
        "_uid",
        "_node",
        "_name",
        "_verifier",
        "_route",
    )
    _KINDS: dict[int, HandleKind] = {}  # value -> kind; a dict lookup is cheaper than Enum()
    _data: bytes
    _kind: HandleKind
    _size: int
    _device: int
    _uid: int
    _node: int
    _route: FdRoute | None

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
        magic, version, kind_value, node, _secret, size, device, uid, tail = _LAYOUT.unpack(raw)
        if magic != _MAGIC:
            raise _invalid("not a hipipc handle (bad magic)")
        if version != _VERSION:
            raise _invalid(f"unsupported handle version {version} (this hipipc reads {_VERSION})")
        kind = self._KINDS.get(kind_value)
        if kind is None:
            raise _invalid(f"not a {type(self).__name__} (kind {kind_value})")
        route = None if tail == _ZERO_TAIL else _parse_route(tail)
        if node == 0:
            raise _invalid("the handle carries no node tag (made by an older hipipc?)")
        if size == 0:
            raise _invalid("handle names an empty allocation")
        self._data = raw
        self._kind = kind
        self._size = size
        self._device = device
        self._uid = uid
        self._node = node
        self._route = route
        self._name: str | None = None
        self._verifier: bytes | None = None

    # Read-only fields: the registry hands its own handle object to callers, and a field
    # rewritten in place would no longer match the bytes (and hash) it was parsed from.
    # attrgetter properties cost next to nothing on the open path.
    if TYPE_CHECKING:  # what the attrgetter properties below return

        @property
        def kind(self) -> HandleKind: ...
        @property
        def size(self) -> int: ...
        @property
        def device(self) -> int: ...
        @property
        def uid(self) -> int: ...
        @property
        def node(self) -> int: ...
        @property
        def fd_route(self) -> FdRoute | None: ...
    else:
        kind = property(operator.attrgetter("_kind"), doc="What the handle names (HandleKind).")
        size = property(operator.attrgetter("_size"), doc="Bytes of the allocation or event state.")
        device = property(operator.attrgetter("_device"), doc="The exporter's device ordinal.")
        uid = property(operator.attrgetter("_uid"), doc="The exporter's effective uid.")
        node = property(operator.attrgetter("_node"), doc="The exporter's node tag (node_tag()).")
        fd_route = property(
            operator.attrgetter("_route"),
            doc="Where the fd transport finds the memory (FdRoute), or None (the store).",
        )

    @property
    def transport(self) -> str:
        """How the handle opens: ``"store"`` (a name in the exporter's store) or ``"fd"``
        (the exporter's memfd, taken with ``pidfd_getfd`` or from its SCM_RIGHTS server)."""
        return "store" if self._route is None else "fd"

    @classmethod
    def new(
        cls: type[_H],
        kind: HandleKind,
        size: int,
        device: int,
        uid: int,
        route: FdRoute | None = None,
    ) -> _H:
        """A fresh handle with a new 128-bit secret (never reused), tagged with
        :func:`node_tag`; ``route`` makes it an fd-transport handle.

        Raises ``HipError(hipErrorInvalidValue)`` when a field does not fit its slot (a size
        of 2**64 bytes or more, a negative or 32-bit-overflowing device or uid).
        """
        try:
            kind = HandleKind(kind)
        except (ValueError, TypeError):  # inf, nan, strings: no kind (int() would overflow)
            raise _invalid(f"{kind!r} is not a HandleKind") from None
        if route is not None and not isinstance(route, FdRoute):
            raise _invalid(f"an fd route is an FdRoute or None, not {type(route).__name__}")
        try:
            raw = _LAYOUT.pack(
                _MAGIC,
                _VERSION,
                int(kind),
                node_tag(),
                secrets.token_bytes(_SECRET_BYTES),
                size,
                device,
                uid,
                _ZERO_TAIL if route is None else route.pack(),
            )
        except struct.error:
            raise _invalid(
                f"cannot describe size {size}, device {device}, uid {uid}, route {route} in "
                "a handle (64-bit size, 32-bit device and uid)"
            ) from None
        return cls(raw)

    @classmethod
    def coerce(cls: type[_H], obj: Any) -> _H:
        """``obj`` if it already is one, else parse it as 64 raw bytes."""
        return obj if type(obj) is cls else cls(obj)

    def _derive(self) -> None:
        # One personalised (unkeyed) BLAKE2b digest gives both: its first 20 bytes name the
        # segment, the other 32 verify it.  Neither reveals the other nor the handle.
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
