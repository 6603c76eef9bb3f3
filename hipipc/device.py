"""Device queries, peer access and the runtime's version calls: what programs ask around the
IPC calls (cuda-samples' simpleIPC preamble, hip-tests' multiproc tests).

Each function validates its arguments, then asks the backend (``device_properties``,
``mem_info``, ``can_access_peer``) or this module's per-process peer-access table.  Values on
the host backend: see :mod:`hipipc.backends.host_device` and the README's tables.
"""

from __future__ import annotations

import operator
import os
import threading
from dataclasses import replace
from typing import Any

from .backends import Allocation, ImportedMemory
from .devtypes import hipDeviceAttribute_t, hipDeviceProp_t
from .errors import HipError, hipError_t
from .registry import get_registry
from .runtime import (
    _integer,
    hipDeviceSynchronize,
    hipMemcpy,
    hipMemcpyAsync,
    hipMemcpyDeviceToDevice,
)
from .streams import Stream

__all__ = [
    "HIP_VERSION",
    "hipInit",
    "hipDriverGetVersion",
    "hipRuntimeGetVersion",
    "hipGetDeviceProperties",
    "hipDeviceGetAttribute",
    "hipDeviceTotalMem",
    "hipDeviceComputeCapability",
    "hipDeviceGetName",
    "hipDeviceCanAccessPeer",
    "hipDeviceEnablePeerAccess",
    "hipDeviceDisablePeerAccess",
    "hipDeviceReset",
    "hipMemGetInfo",
    "hipMemcpyPeer",
    "hipMemcpyPeerAsync",
]

#: The HIP version hipipc's API follows: HIP 6.2 (HIP's encoding: major * 10**7 + minor * 10**5
#: + patch).  Its error codes, ``hipDeviceAttribute_t`` and ``hipMemoryType`` values are 6.2's.
HIP_VERSION = 6 * 10**7 + 2 * 10**5

_A = hipDeviceAttribute_t
_NOT_SUPPORTED = 0  # textures, surfaces, cooperative launches: the host backend has none
# hipDeviceGetAttribute -> the hipDeviceProp_t field that holds its value (None: 0, unsupported)
_ATTRIBUTE_FIELDS: dict[hipDeviceAttribute_t, str] = {
    _A.hipDeviceAttributeEccEnabled: "ECCEnabled",
    _A.hipDeviceAttributeAccessPolicyMaxWindowSize: "accessPolicyMaxWindowSize",
    _A.hipDeviceAttributeAsyncEngineCount: "asyncEngineCount",
    _A.hipDeviceAttributeCanMapHostMemory: "canMapHostMemory",
    _A.hipDeviceAttributeCanUseHostPointerForRegisteredMem: "canUseHostPointerForRegisteredMem",
    _A.hipDeviceAttributeClockRate: "clockRate",
    _A.hipDeviceAttributeComputeMode: "computeMode",
    _A.hipDeviceAttributeComputePreemptionSupported: "computePreemptionSupported",
    _A.hipDeviceAttributeConcurrentKernels: "concurrentKernels",
    _A.hipDeviceAttributeConcurrentManagedAccess: "concurrentManagedAccess",
    _A.hipDeviceAttributeCooperativeLaunch: "cooperativeLaunch",
    _A.hipDeviceAttributeCooperativeMultiDeviceLaunch: "cooperativeMultiDeviceLaunch",
    _A.hipDeviceAttributeDeviceOverlap: "deviceOverlap",
    _A.hipDeviceAttributeDirectManagedMemAccessFromHost: "directManagedMemAccessFromHost",
    _A.hipDeviceAttributeGlobalL1CacheSupported: "globalL1CacheSupported",
    _A.hipDeviceAttributeHostNativeAtomicSupported: "hostNativeAtomicSupported",
    _A.hipDeviceAttributeIntegrated: "integrated",
    _A.hipDeviceAttributeIsMultiGpuBoard: "isMultiGpuBoard",
    _A.hipDeviceAttributeKernelExecTimeout: "kernelExecTimeoutEnabled",
    _A.hipDeviceAttributeL2CacheSize: "l2CacheSize",
    _A.hipDeviceAttributeLocalL1CacheSupported: "localL1CacheSupported",
    _A.hipDeviceAttributeComputeCapabilityMajor: "major",
    _A.hipDeviceAttributeComputeCapabilityMinor: "minor",
    _A.hipDeviceAttributeManagedMemory: "managedMemory",
    _A.hipDeviceAttributeMaxBlocksPerMultiProcessor: "maxBlocksPerMultiProcessor",
    _A.hipDeviceAttributeMaxThreadsPerBlock: "maxThreadsPerBlock",
    _A.hipDeviceAttributeMaxThreadsPerMultiProcessor: "maxThreadsPerMultiProcessor",
    _A.hipDeviceAttributeMaxPitch: "memPitch",
    _A.hipDeviceAttributeMemoryBusWidth: "memoryBusWidth",
    _A.hipDeviceAttributeMemoryClockRate: "memoryClockRate",
    _A.hipDeviceAttributeMultiGpuBoardGroupID: "multiGpuBoardGroupID",
    _A.hipDeviceAttributeMultiprocessorCount: "multiProcessorCount",
    _A.hipDeviceAttributePhysicalMultiProcessorCount: "multiProcessorCount",
    _A.hipDeviceAttributePageableMemoryAccess: "pageableMemoryAccess",
    _A.hipDeviceAttributePageableMemoryAccessUsesHostPageTables: (
        "pageableMemoryAccessUsesHostPageTables"
    ),
    _A.hipDeviceAttributePciBusId: "pciBusID",
    _A.hipDeviceAttributePciDeviceId: "pciDeviceID",
    _A.hipDeviceAttributePciDomainId: "pciDomainID",
    _A.hipDeviceAttributePersistingL2CacheMaxSize: "persistingL2CacheMaxSize",
    _A.hipDeviceAttributeMaxRegistersPerBlock: "regsPerBlock",
    _A.hipDeviceAttributeMaxRegistersPerMultiprocessor: "regsPerMultiprocessor",
    _A.hipDeviceAttributeReservedSharedMemPerBlock: "reservedSharedMemPerBlock",
    _A.hipDeviceAttributeMaxSharedMemoryPerBlock: "sharedMemPerBlock",
    _A.hipDeviceAttributeSharedMemPerBlockOptin: "sharedMemPerBlockOptin",
    _A.hipDeviceAttributeSharedMemPerMultiprocessor: "sharedMemPerMultiprocessor",
    _A.hipDeviceAttributeMaxSharedMemoryPerMultiprocessor: "maxSharedMemoryPerMultiProcessor",
    _A.hipDeviceAttributeSingleToDoublePrecisionPerfRatio: "singleToDoublePrecisionPerfRatio",
    _A.hipDeviceAttributeStreamPrioritiesSupported: "streamPrioritiesSupported",
    _A.hipDeviceAttributeTccDriver: "tccDriver",
    _A.hipDeviceAttributeTextureAlignment: "textureAlignment",
    _A.hipDeviceAttributeTexturePitchAlignment: "texturePitchAlignment",
    _A.hipDeviceAttributeTotalConstantMemory: "totalConstMem",
    _A.hipDeviceAttributeTotalGlobalMem: "totalGlobalMem",
    _A.hipDeviceAttributeUnifiedAddressing: "unifiedAddressing",
    _A.hipDeviceAttributeWarpSize: "warpSize",
    _A.hipDeviceAttributeMemoryPoolsSupported: "memoryPoolsSupported",
    _A.hipDeviceAttributeHostRegisterSupported: "hostRegisterSupported",
    _A.hipDeviceAttributeMemoryPoolSupportedHandleTypes: "memoryPoolSupportedHandleTypes",
    _A.hipDeviceAttributeClockInstructionRate: "clockInstructionRate",
    _A.hipDeviceAttributeIsLargeBar: "isLargeBar",
    _A.hipDeviceAttributeAsicRevision: "asicRevision",
}
_DIM_FIELDS = {
    _A.hipDeviceAttributeMaxBlockDimX: ("maxThreadsDim", 0),
    _A.hipDeviceAttributeMaxBlockDimY: ("maxThreadsDim", 1),
    _A.hipDeviceAttributeMaxBlockDimZ: ("maxThreadsDim", 2),
    _A.hipDeviceAttributeMaxGridDimX: ("maxGridSize", 0),
    _A.hipDeviceAttributeMaxGridDimY: ("maxGridSize", 1),
    _A.hipDeviceAttributeMaxGridDimZ: ("maxGridSize", 2),
}
_INT_MAX = 2**31 - 1


def _invalid(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidValue, detail)


def _device(device: Any, what: str) -> int:
    """``device`` as an ordinal of the backend; ``hipErrorInvalidDevice`` otherwise (HIP)."""
    count = get_registry().backend.device_count()
    try:
        if isinstance(device, bool):
            raise TypeError
        n = operator.index(device)
    except TypeError:
        raise HipError(
            hipError_t.hipErrorInvalidDevice,
            f"{what}: device must be an int, not {type(device).__name__}",
        ) from None
    if not 0 <= n < count:
        raise HipError(
            hipError_t.hipErrorInvalidDevice,
            f"{what}: device {n} does not exist ({count} device(s))",
        )
    return n


# -- runtime ---------------------------------------------------------------------------


def hipInit(flags: int = 0) -> None:
    """Start the runtime (optional, as in HIP: any call starts it).  ``flags`` must be 0
    (``hipErrorInvalidValue``); ``hipErrorNoDevice`` if the backend has no device."""
    if _integer(flags, "hipInit flags") != 0:
        raise _invalid(f"hipInit flags must be 0, got {flags!r}")
    get_registry().backend.device_count()


def hipDriverGetVersion() -> int:
    """:data:`HIP_VERSION`: on AMD, HIP's driver and runtime versions are the same number."""
    return HIP_VERSION


def hipRuntimeGetVersion() -> int:
    """:data:`HIP_VERSION` (6.2.0 encoded as HIP does: 60200000)."""
    return HIP_VERSION


# -- device queries --------------------------------------------------------------------


def hipGetDeviceProperties(device: int) -> hipDeviceProp_t:
    """The properties of ``device`` (a fresh object each call).  ``hipErrorInvalidDevice``
    for a device that does not exist."""
    device = _device(device, "hipGetDeviceProperties")
    return replace(get_registry().backend.device_properties(device))


def hipDeviceGetAttribute(attr: int, device: int) -> int:
    """One property of ``device`` as an int (sizes clamped to ``INT_MAX`` as HIP does).

    Raises ``hipErrorInvalidValue`` for a value that is not a ``hipDeviceAttribute_t`` (or
    names something without an int value, such as ``hipDeviceAttributeLuid``) and
    ``hipErrorInvalidDevice`` for a device that does not exist.  Attributes of features the
    backend lacks (textures, surfaces, cooperative launch) are 0.
    """
    try:
        if isinstance(attr, bool):
            raise ValueError
        attr = hipDeviceAttribute_t(attr)
    except (ValueError, TypeError):
        raise _invalid(f"hipDeviceGetAttribute: {attr!r} is not a hipDeviceAttribute_t") from None
    device = _device(device, "hipDeviceGetAttribute")
    props = get_registry().backend.device_properties(device)
    if attr in _DIM_FIELDS:
        name, i = _DIM_FIELDS[attr]
        value = getattr(props, name)[i]
    elif attr in _ATTRIBUTE_FIELDS:
        value = getattr(props, _ATTRIBUTE_FIELDS[attr])
    elif attr.name.startswith(
        (
            "hipDeviceAttributeMaxTexture",
            "hipDeviceAttributeMaxSurface",
            "hipDeviceAttributeCooperativeMultiDeviceUnmatched",
        )
    ) or attr in (
        _A.hipDeviceAttributeMaxThreadsDim,
        _A.hipDeviceAttributeSurfaceAlignment,
        _A.hipDeviceAttributeVirtualMemoryManagementSupported,
        _A.hipDeviceAttributeCanUseStreamWaitValue,
        _A.hipDeviceAttributeImageSupport,
        _A.hipDeviceAttributeHdpMemFlushCntl,
        _A.hipDeviceAttributeHdpRegFlushCntl,
        _A.hipDeviceAttributeFineGrainSupport,
        _A.hipDeviceAttributeWallClockRate,
    ):
        value = _NOT_SUPPORTED
    else:  # Luid, LuidDeviceNodeMask, the range markers: no int value
        raise _invalid(f"hipDeviceGetAttribute: {attr.name} has no integer value")
    return min(int(value), _INT_MAX)


def hipDeviceTotalMem(device: int) -> int:
    """``hipGetDeviceProperties(device).totalGlobalMem``."""
    return hipGetDeviceProperties(device).totalGlobalMem


def hipDeviceComputeCapability(device: int) -> tuple[int, int]:
    """(major, minor) of ``device``; ``hipErrorInvalidDevice`` if it does not exist."""
    props = hipGetDeviceProperties(device)
    return props.major, props.minor


def hipDeviceGetName(device: int) -> str:
    """``hipGetDeviceProperties(device).name``."""
    return hipGetDeviceProperties(device).name


def hipMemGetInfo() -> tuple[int, int]:
    """(free, total) bytes of the current device's memory.

    Host backend: the free and total space of the file system behind the store (the tmpfs
    ``hipMalloc`` reserves from; all host devices share it), by ``statvfs``.
    """
    reg = get_registry()
    return reg.backend.mem_info(reg.device)


# -- peer access -----------------------------------------------------------------------

_peer_lock = threading.Lock()
_peers: set[tuple[int, int]] = set()  # (device, peer) pairs enabled in this process


def hipDeviceCanAccessPeer(device: int, peer: int) -> int:
    """1 if ``device`` can access ``peer``'s memory, else 0; 0 for ``device == peer`` (HIP's
    rule).  Host backend: every other device.  ``hipErrorInvalidDevice`` for a device that
    does not exist."""
    device = _device(device, "hipDeviceCanAccessPeer")
    peer = _device(peer, "hipDeviceCanAccessPeer")
    if device == peer:
        return 0
    return int(bool(get_registry().backend.can_access_peer(device, peer)))


def hipDeviceEnablePeerAccess(peer: int, flags: int = 0) -> None:
    """Let the current device access ``peer``'s memory (per process, as in HIP).

    Raises ``hipErrorInvalidDevice`` for a ``peer`` that does not exist, is the current
    device or cannot be accessed; ``hipErrorInvalidValue`` for ``flags`` other than 0;
    ``hipErrorPeerAccessAlreadyEnabled`` if it is enabled already.  IPC needs none of this
    (``hipIpcMemLazyEnablePeerAccess``); ported preambles call it anyway.
    """
    peer = _device(peer, "hipDeviceEnablePeerAccess")
    if _integer(flags, "hipDeviceEnablePeerAccess flags") != 0:
        raise _invalid(f"hipDeviceEnablePeerAccess flags must be 0, got {flags!r}")
    device = get_registry().device
    if peer == device or not hipDeviceCanAccessPeer(device, peer):
        raise HipError(
            hipError_t.hipErrorInvalidDevice,
            f"hipDeviceEnablePeerAccess: device {device} cannot access device "
            f"{peer}" + (" (itself)" if peer == device else ""),
        )
    with _peer_lock:
        if (device, peer) in _peers:
            raise HipError(
                hipError_t.hipErrorPeerAccessAlreadyEnabled, f"device {device} -> {peer}"
            )
        _peers.add((device, peer))


def hipDeviceDisablePeerAccess(peer: int) -> None:
    """Undo ``hipDeviceEnablePeerAccess(peer)`` for the current device.

    Raises ``hipErrorInvalidDevice`` for a ``peer`` that does not exist and
    ``hipErrorPeerAccessNotEnabled`` if access is not enabled.
    """
    peer = _device(peer, "hipDeviceDisablePeerAccess")
    device = get_registry().device
    with _peer_lock:
        if (device, peer) not in _peers:
            raise HipError(hipError_t.hipErrorPeerAccessNotEnabled, f"device {device} -> {peer}")
        _peers.discard((device, peer))


def hipDeviceReset() -> None:
    """Reset the current device in this process: wait for its work, free every allocation
    (memory-pool allocations and imported pool pointers too; the pools stay) and close every
    import this process holds on it (exports are revoked), and disable its
    peer access.  Streams and events stay valid (they hold no device memory here; HIP
    destroys them).  Use no pointer on the device afterwards, as in HIP."""
    reg = get_registry()
    device = reg.device
    try:
        hipDeviceSynchronize()
    except HipError as exc:
        if exc.code != hipError_t.hipErrorLaunchFailure:
            raise
        # A failure of work not yet reported: the reset discards it, as CUDA's does.
    for region in reg.regions_on(device):
        if isinstance(region, ImportedMemory):  # one close per open
            for _ in range(region.refs):
                reg.close(region.ptr)
        elif isinstance(region, Allocation):  # not pinned host memory: HIP keeps that
            reg.free(region.ptr)
        elif getattr(region, "owner", None) is not None:  # memory-pool memory (mempool.py)
            for _ in range(region.refs):  # type: ignore[attr-defined]  # one free per import
                reg.free(region.ptr)
    with _peer_lock:
        _peers.difference_update({p for p in _peers if p[0] == device})


# -- peer copies -----------------------------------------------------------------------


def hipMemcpyPeer(dst: int, dstDevice: int, src: int, srcDevice: int, nbytes: int) -> None:
    """Copy ``nbytes`` of device memory between devices (HIP: a device-to-device
    ``hipMemcpy``).  ``hipErrorInvalidDevice`` for a device that does not exist; otherwise
    ``hipMemcpy``'s errors."""
    _device(dstDevice, "hipMemcpyPeer")
    _device(srcDevice, "hipMemcpyPeer")
    hipMemcpy(dst, src, nbytes, hipMemcpyDeviceToDevice)


def hipMemcpyPeerAsync(
    dst: int, dstDevice: int, src: int, srcDevice: int, nbytes: int, stream: Stream | None = None
) -> None:
    """``hipMemcpyPeer`` enqueued on ``stream`` (``hipMemcpyAsync``'s rules and errors)."""
    _device(dstDevice, "hipMemcpyPeerAsync")
    _device(srcDevice, "hipMemcpyPeerAsync")
    hipMemcpyAsync(dst, src, nbytes, hipMemcpyDeviceToDevice, stream)


def _after_fork_in_child() -> None:
    global _peer_lock
    _peer_lock = threading.Lock()
    _peers.clear()  # a forked child starts a fresh runtime (see hipipc.registry)


os.register_at_fork(after_in_child=_after_fork_in_child)
