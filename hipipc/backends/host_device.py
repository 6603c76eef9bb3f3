"""Device and host-memory queries of the host backend (mixed into :class:`HostBackend`).

The "device" is the CPU and its memory is the tmpfs behind the store, so every value here is
read from the machine: the CPU model and clock from ``/proc/cpuinfo``, the CPUs this process
may run on, the size and free space of the store's file system.  Limits that only mean
something to a GPU kernel launch carry HIP's usual values (hipipc enforces none of them: a
host-backend "kernel" is a host function).  The README's "Device queries" table lists them.

"Pinned" host memory is a page-aligned private anonymous mapping, locked in RAM with
``mlock`` when the process may (``RLIMIT_MEMLOCK``).  ``$HIPIPC_PIN`` decides what a failed
lock does: ``try`` (default: the memory stays pageable, quietly), ``require``
(``hipErrorOutOfMemory``), ``off`` (never lock).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform

from ..devtypes import hipComputeModeDefault, hipDeviceProp_t
from ..errors import HipError, hipError_t
from ..mapping import Mapping, _libc, _mmap
from ..segstore import Transports
from ..store import PAGE_SIZE

__all__ = ["HostDeviceMixin", "PIN_ENV"]

PIN_ENV = "HIPIPC_PIN"
_PIN_POLICIES = ("try", "require", "off")

_PROT_RW = 0x1 | 0x2
_MAP_PRIVATE = 0x02
_MAP_ANONYMOUS = 0x20
_MAP_FAILED = ctypes.c_void_p(-1).value

_mlock = _libc.mlock
_mlock.restype = ctypes.c_int
_mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munlock = _libc.munlock
_munlock.restype = ctypes.c_int
_munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, int]:
    """(CPU model name, clock in kHz; 0 if unknown), from the first processor's entry."""
    name, khz = "", 0
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip().lower(), value.strip()
                if not name and key in ("model name", "hardware", "cpu model", "uarch"):
                    name = value
                elif not khz and key == "cpu mhz":
                    try:
                        khz = int(float(value) * 1000)
                    except ValueError:
                        pass
                elif not line.strip() and name:
                    break  # the end of the first processor's entry
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "host CPU", khz


def _l2_cache_size() -> int:
    try:
        return max(0, int(os.sysconf("SC_LEVEL2_CACHE_SIZE")))
    except (ValueError, OSError):
        return 0


def _statvfs_nearest(path: str) -> os.statvfs_result:
    """statvfs of ``path``, or of its nearest existing ancestor (the store may not exist yet:
    it is created on first export, on the same file system as its parent)."""
    while True:
        try:
            return os.statvfs(path)
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if parent == path:
                raise
            path = parent


def _pin_policy() -> str:
    policy = os.environ.get(PIN_ENV, "try").strip().lower() or "try"
    if policy not in _PIN_POLICIES:
        raise HipError(
            hipError_t.hipErrorInvalidValue,
            f"${PIN_ENV}={policy!r}: expected one of {', '.join(_PIN_POLICIES)}",
        )
    return policy


class HostDeviceMixin:
    """The query and host-memory methods of :class:`~hipipc.backends.base.Backend` for the
    host backend; needs ``self.store``."""

    store: Transports

    def device_properties(self, device: int) -> hipDeviceProp_t:
        name, khz = _cpuinfo()
        _, total = self.mem_info(device)
        cpus = len(os.sched_getaffinity(0))
        return hipDeviceProp_t(
            name=name,
            totalGlobalMem=total,
            multiProcessorCount=cpus,
            clockRate=khz,
            clockInstructionRate=khz,
            l2CacheSize=_l2_cache_size(),
            # Compute capability: HIP reports the GPU generation (gfx9 -> 9.0).  The host
            # backend runs no device code; 9.0 passes the minimum-capability checks of
            # cuda-samples and hip-tests (IPC needs >= 2.0) and claims no instruction set.
            major=9,
            minor=0,
            # One CPU thread runs a host-backend kernel: no lanes run in lockstep.
            warpSize=1,
            # Kernel-launch limits: HIP's usual values, not enforced (no grid on the host).
            maxThreadsPerBlock=1024,
            maxThreadsDim=(1024, 1024, 1024),
            maxGridSize=(2**31 - 1, 65536, 65536),
            maxThreadsPerMultiProcessor=2048,
            maxBlocksPerMultiProcessor=32,
            sharedMemPerBlock=65536,
            sharedMemPerMultiprocessor=65536,
            maxSharedMemoryPerMultiProcessor=65536,
            sharedMemPerBlockOptin=65536,
            regsPerBlock=65536,
            regsPerMultiprocessor=65536,
            memPitch=2**31 - 1,
            textureAlignment=256,
            texturePitchAlignment=256,
            # The device is the host: its memory is host memory, reachable by pointer.
            integrated=1,
            unifiedAddressing=1,
            canMapHostMemory=1,
            canUseHostPointerForRegisteredMem=1,
            pageableMemoryAccess=1,
            pageableMemoryAccessUsesHostPageTables=1,
            hostNativeAtomicSupported=1,
            hostRegisterSupported=1,
            computeMode=hipComputeModeDefault,
            concurrentKernels=1,
            asyncEngineCount=1,
            deviceOverlap=1,
            isMultiGpuBoard=0,
            pciBusID=0,
            pciDeviceID=0,
            pciDomainID=0,
            # No managed memory; stream-ordered pools (hipipc.mempool) with POSIX-fd IPC.
            managedMemory=0,
            concurrentManagedAccess=0,
            memoryPoolsSupported=1,
            memoryPoolSupportedHandleTypes=1,  # hipMemHandleTypePosixFileDescriptor
            gcnArchName="host",
        )

    def mem_info(self, device: int) -> tuple[int, int]:
        st = _statvfs_nearest(self.store.own_path())
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def can_access_peer(self, device: int, peer: int) -> bool:
        return True  # every host "device" is the same address space

    def host_alloc(self, nbytes: int, flags: int) -> tuple[Mapping, bool]:
        policy = _pin_policy()
        length = -(-nbytes // PAGE_SIZE) * PAGE_SIZE
        addr = _mmap(None, length, _PROT_RW, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise HipError(
                hipError_t.hipErrorOutOfMemory,
                f"hipHostMalloc: mmap of {length} bytes failed: {os.strerror(err)}",
            )
        mapping = Mapping(addr, length)
        try:
            locked = policy != "off" and self._lock(addr, length, policy)
        except BaseException:
            mapping.release()
            raise
        return mapping, locked

    def host_lock(self, addr: int, nbytes: int) -> bool:
        policy = _pin_policy()
        return policy != "off" and self._lock(addr, nbytes, policy)

    def host_unlock(self, addr: int, nbytes: int) -> None:
        _munlock(addr, nbytes)  # never fails for a range of mapped pages

    @staticmethod
    def _lock(addr: int, nbytes: int, policy: str) -> bool:
        if _mlock(addr, nbytes) == 0:
            return True
        err = ctypes.get_errno()
        if policy == "require":
            hint = (
                " (raise RLIMIT_MEMLOCK: ulimit -l)" if err in (errno.ENOMEM, errno.EPERM) else ""
            )
            raise HipError(
                hipError_t.hipErrorOutOfMemory,
                f"mlock of {nbytes} bytes failed: {os.strerror(err)}{hint}; "
                f"${PIN_ENV}=try keeps such memory pageable instead",
            )
        return False
