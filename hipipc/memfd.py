"""Sealed anonymous memory files (``memfd_create``): memory that no file system names.

The fd transport (issue 13) and IPC memory pools build on this: one memfd per allocation or
pool, reserved up front so that a full memory gives ``hipErrorOutOfMemory`` at allocation,
never SIGBUS on first touch, and sealed against shrinking and growing so that no process that
receives the descriptor can truncate the memory under the others' mappings.

``F_SEAL_SEAL`` is part of :data:`SEALS`: without it a receiver could add
``F_SEAL_FUTURE_WRITE`` and break the exporter's later writable mappings.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

from .errors import HipError, hipError_t
from .store import _fd_exhausted, _os_call

__all__ = ["SEALS", "available_memory", "create_memfd", "memfd_supported", "reserve", "seals_of"]

# Values from <linux/fcntl.h>; Python's fcntl module has them from 3.8 on, but spelled here so
# that a missing constant cannot make import fail on an odd build.
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
F_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x0008)

SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL
"""The seals every hipipc memfd carries once its size is final."""

# The name shows in /proc/<pid>/fd and /proc/<pid>/maps ("/memfd:hipipc (deleted)"): a
# constant, so that it reveals nothing about the handle.
_NAME = "hipipc"


_supported: bool | None = None


def memfd_supported() -> bool:
    """Whether this kernel gives sealable memfds (Linux 3.17+, and not refused by seccomp).

    Asked once per process.  At the descriptor limit there is nothing to probe with: that
    raises ``hipErrorOutOfMemory`` naming the limit (after raising the soft one) and is not
    remembered, so a process that was out of descriptors once is not refused for good."""
    global _supported
    if _supported is None:
        _supported = _probe()
    return _supported


def _probe() -> bool:
    if not hasattr(os, "memfd_create"):
        return False
    try:
        fd = _os_call(
            "probing for sealable memfds",
            os.memfd_create,
            _NAME,
            os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING,
        )
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, F_ADD_SEALS, SEALS)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _out_of_memory(nbytes: int, exc: OSError) -> HipError:
    return HipError(
        hipError_t.hipErrorOutOfMemory,
        f"cannot reserve {nbytes} bytes of anonymous shared memory: {exc.strerror} "
        "(memory, swap or the memory cgroup's limit is exhausted)",
    )


# Below this a reservation is not checked against the memory left: it cannot exhaust it alone.
# Small ones are counted, though, and checked once they add up to as much (a pool's many small
# allocations would otherwise reach the OOM killer one by one, never checked).
_CHECK_ABOVE = 16 << 20
_unchecked = 0
_unchecked_lock = threading.Lock()


def _due_for_check(nbytes: int) -> bool:
    global _unchecked
    with _unchecked_lock:
        _unchecked += nbytes
        if nbytes < _CHECK_ABOVE and _unchecked < _CHECK_ABOVE:
            return False
        _unchecked = 0
        return True


def _after_fork_in_child() -> None:  # a thread may have held the lock at fork: a fresh one
    global _unchecked_lock
    _unchecked_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _limit_from(path: str, usage: str) -> int | None:
    try:
        with open(path) as f:
            raw = f.read().strip()
        with open(usage) as f:
            used = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if not raw.isdigit() or int(raw) >= 1 << 60:  # "max", or v1's "unlimited" value
        return None
    return max(0, int(raw) - used)


def available_memory() -> int:
    """Bytes a new reservation may take: MemAvailable + SwapFree, capped by the memory
    cgroup's limit where one is set (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``)."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("MemAvailable", "SwapFree"):
                    fields[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 1 << 62  # no way to know: let the kernel decide
    free = fields.get("MemAvailable", 1 << 62) + fields.get("SwapFree", 0)
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        left = _limit_from(limit, usage)
        if left is not None:
            free = min(free, left)
    return free


def reserve(fd: int, offset: int, nbytes: int) -> None:
    """Commit ``[offset, offset + nbytes)`` of the memfd ``fd`` (``posix_fallocate``).

    Raises ``hipErrorOutOfMemory`` when the memory cannot be had; allowed under
    ``F_SEAL_GROW`` as long as the range lies inside the file.  A memfd lives on the kernel's
    internal tmpfs, which has no size limit: ``posix_fallocate`` of more than the machine
    has does not fail with ENOSPC but wakes the OOM killer.  So a large reservation, and every
    16 MiB of small ones, is first checked against :func:`available_memory`.
    """
    if _due_for_check(nbytes) and nbytes > available_memory():
        raise HipError(
            hipError_t.hipErrorOutOfMemory,
            f"cannot reserve {nbytes} bytes of anonymous shared memory: only "
            f"{available_memory()} bytes of memory and swap are available",
        )
    try:
        os.posix_fallocate(fd, offset, nbytes)
    except OverflowError:
        raise HipError(
            hipError_t.hipErrorOutOfMemory,
            f"cannot reserve {nbytes} bytes: larger than any file can be",
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT):
            raise _out_of_memory(nbytes, exc) from exc
        raise HipError(
            hipError_t.hipErrorOperatingSystem,
            f"cannot reserve {nbytes} bytes of anonymous shared memory: {exc.strerror}",
        ) from exc


def create_memfd(size: int, *, commit: bool = True) -> int:
    """A new close-on-exec memfd of exactly ``size`` bytes, sealed with :data:`SEALS`.

    ``commit`` reserves every byte now (an allocation); False leaves the pages to be
    committed range by range with :func:`reserve` (a memory pool).  Raises
    ``hipErrorOutOfMemory`` when the memory or the descriptor limit is exhausted (naming the
    limit), ``hipErrorNotSupported`` when the kernel has no sealable memfds.
    """
    if not memfd_supported():
        raise HipError(
            hipError_t.hipErrorNotSupported,
            "this kernel gives no sealable memfd (memfd_create with MFD_ALLOW_SEALING): "
            "use the store transport (HIPIPC_TRANSPORT=store)",
        )
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        fd = _os_call("creating a memfd", os.memfd_create, _NAME, flags)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _fd_exhausted("creating a memfd") from exc
        raise HipError(
            hipError_t.hipErrorOperatingSystem, f"memfd_create failed: {exc.strerror}"
        ) from exc
    try:
        try:
            os.ftruncate(fd, size)
        except (OverflowError, ValueError):
            raise HipError(
                hipError_t.hipErrorOutOfMemory,
                f"cannot reserve {size} bytes: larger than any file can be",
            ) from None
        except OSError as exc:
            if exc.errno in (errno.EFBIG, errno.EINVAL, errno.ENOSPC, errno.ENOMEM):
                raise _out_of_memory(size, exc) from exc
            raise
        if commit and size:
            reserve(fd, 0, size)
        fcntl.fcntl(fd, F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seals_of(fd: int) -> int:
    """The seals on ``fd`` (0 for a file that cannot be sealed)."""
    try:
        return fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        return 0
