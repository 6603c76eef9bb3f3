"""The value types of HIP's device and pointer queries, with HIP's field names and values.

Nothing here talks to a backend: :mod:`hipipc.device` and :mod:`hipipc.hostmem` fill these in
from the backend's answers.  Enum values are those of HIP 6.2's ``hip_runtime_api.h`` /
``driver_types.h`` (the "Unused" placeholders HIP keeps in ``hipDeviceAttribute_t`` are left
out; the numbering around them is HIP's).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "hipDeviceProp_t",
    "hipDeviceAttribute_t",
    "hipComputeMode",
    "hipComputeModeDefault",
    "hipComputeModeExclusive",
    "hipComputeModeProhibited",
    "hipComputeModeExclusiveProcess",
    "hipMemoryType",
    "hipMemoryTypeUnregistered",
    "hipMemoryTypeHost",
    "hipMemoryTypeDevice",
    "hipMemoryTypeManaged",
    "hipPointerAttribute_t",
]


class hipComputeMode(enum.IntEnum):
    """``hipDeviceProp_t.computeMode``, with HIP's values."""

    hipComputeModeDefault = 0
    hipComputeModeExclusive = 1
    hipComputeModeProhibited = 2
    hipComputeModeExclusiveProcess = 3


hipComputeModeDefault = hipComputeMode.hipComputeModeDefault
hipComputeModeExclusive = hipComputeMode.hipComputeModeExclusive
hipComputeModeProhibited = hipComputeMode.hipComputeModeProhibited
hipComputeModeExclusiveProcess = hipComputeMode.hipComputeModeExclusiveProcess


class hipMemoryType(enum.IntEnum):
    """``hipPointerAttribute_t.type``, with HIP 6's values (those of CUDA's
    ``cudaMemoryType``; HIP 5 numbered them differently)."""

    hipMemoryTypeUnregistered = 0
    hipMemoryTypeHost = 1
    hipMemoryTypeDevice = 2
    hipMemoryTypeManaged = 3
    hipMemoryTypeArray = 10
    hipMemoryTypeUnified = 11


hipMemoryTypeUnregistered = hipMemoryType.hipMemoryTypeUnregistered
hipMemoryTypeHost = hipMemoryType.hipMemoryTypeHost
hipMemoryTypeDevice = hipMemoryType.hipMemoryTypeDevice
hipMemoryTypeManaged = hipMemoryType.hipMemoryTypeManaged


class hipDeviceAttribute_t(enum.IntEnum):
    """What ``hipDeviceGetAttribute`` can be asked, with HIP's values."""

    hipDeviceAttributeEccEnabled = 0
    hipDeviceAttributeAccessPolicyMaxWindowSize = 1
    hipDeviceAttributeAsyncEngineCount = 2
    hipDeviceAttributeCanMapHostMemory = 3
    hipDeviceAttributeCanUseHostPointerForRegisteredMem = 4
    hipDeviceAttributeClockRate = 5
    hipDeviceAttributeComputeMode = 6
    hipDeviceAttributeComputePreemptionSupported = 7
    hipDeviceAttributeConcurrentKernels = 8
    hipDeviceAttributeConcurrentManagedAccess = 9
    hipDeviceAttributeCooperativeLaunch = 10
    hipDeviceAttributeCooperativeMultiDeviceLaunch = 11
    hipDeviceAttributeDeviceOverlap = 12
    hipDeviceAttributeDirectManagedMemAccessFromHost = 13
    hipDeviceAttributeGlobalL1CacheSupported = 14
    hipDeviceAttributeHostNativeAtomicSupported = 15
    hipDeviceAttributeIntegrated = 16
    hipDeviceAttributeIsMultiGpuBoard = 17
    hipDeviceAttributeKernelExecTimeout = 18
    hipDeviceAttributeL2CacheSize = 19
    hipDeviceAttributeLocalL1CacheSupported = 20
    hipDeviceAttributeLuid = 21
    hipDeviceAttributeLuidDeviceNodeMask = 22
    hipDeviceAttributeComputeCapabilityMajor = 23
    hipDeviceAttributeManagedMemory = 24
    hipDeviceAttributeMaxBlocksPerMultiProcessor = 25
    hipDeviceAttributeMaxBlockDimX = 26
    hipDeviceAttributeMaxBlockDimY = 27
    hipDeviceAttributeMaxBlockDimZ = 28
    hipDeviceAttributeMaxGridDimX = 29
    hipDeviceAttributeMaxGridDimY = 30
    hipDeviceAttributeMaxGridDimZ = 31
    hipDeviceAttributeMaxSurface1D = 32
    hipDeviceAttributeMaxSurface1DLayered = 33
    hipDeviceAttributeMaxSurface2D = 34
    hipDeviceAttributeMaxSurface2DLayered = 35
    hipDeviceAttributeMaxSurface3D = 36
    hipDeviceAttributeMaxSurfaceCubemap = 37
    hipDeviceAttributeMaxSurfaceCubemapLayered = 38
    hipDeviceAttributeMaxTexture1DWidth = 39
    hipDeviceAttributeMaxTexture1DLayered = 40
    hipDeviceAttributeMaxTexture1DLinear = 41
    hipDeviceAttributeMaxTexture1DMipmap = 42
    hipDeviceAttributeMaxTexture2DWidth = 43
    hipDeviceAttributeMaxTexture2DHeight = 44
    hipDeviceAttributeMaxTexture2DGather = 45
    hipDeviceAttributeMaxTexture2DLayered = 46
    hipDeviceAttributeMaxTexture2DLinear = 47
    hipDeviceAttributeMaxTexture2DMipmap = 48
    hipDeviceAttributeMaxTexture3DWidth = 49
    hipDeviceAttributeMaxTexture3DHeight = 50
    hipDeviceAttributeMaxTexture3DDepth = 51
    hipDeviceAttributeMaxTexture3DAlt = 52
    hipDeviceAttributeMaxTextureCubemap = 53
    hipDeviceAttributeMaxTextureCubemapLayered = 54
    hipDeviceAttributeMaxThreadsDim = 55
    hipDeviceAttributeMaxThreadsPerBlock = 56
    hipDeviceAttributeMaxThreadsPerMultiProcessor = 57
    hipDeviceAttributeMaxPitch = 58
    hipDeviceAttributeMemoryBusWidth = 59
    hipDeviceAttributeMemoryClockRate = 60
    hipDeviceAttributeComputeCapabilityMinor = 61
    hipDeviceAttributeMultiGpuBoardGroupID = 62
    hipDeviceAttributeMultiprocessorCount = 63
    hipDeviceAttributePageableMemoryAccess = 65
    hipDeviceAttributePageableMemoryAccessUsesHostPageTables = 66
    hipDeviceAttributePciBusId = 67
    hipDeviceAttributePciDeviceId = 68
    hipDeviceAttributePciDomainId = 69
    hipDeviceAttributePersistingL2CacheMaxSize = 70
    hipDeviceAttributeMaxRegistersPerBlock = 71
    hipDeviceAttributeMaxRegistersPerMultiprocessor = 72
    hipDeviceAttributeReservedSharedMemPerBlock = 73
    hipDeviceAttributeMaxSharedMemoryPerBlock = 74
    hipDeviceAttributeSharedMemPerBlockOptin = 75
    hipDeviceAttributeSharedMemPerMultiprocessor = 76
    hipDeviceAttributeSingleToDoublePrecisionPerfRatio = 77
    hipDeviceAttributeStreamPrioritiesSupported = 78
    hipDeviceAttributeSurfaceAlignment = 79
    hipDeviceAttributeTccDriver = 80
    hipDeviceAttributeTextureAlignment = 81
    hipDeviceAttributeTexturePitchAlignment = 82
    hipDeviceAttributeTotalConstantMemory = 83
    hipDeviceAttributeTotalGlobalMem = 84
    hipDeviceAttributeUnifiedAddressing = 85
    hipDeviceAttributeWarpSize = 87
    hipDeviceAttributeMemoryPoolsSupported = 88
    hipDeviceAttributeVirtualMemoryManagementSupported = 89
    hipDeviceAttributeHostRegisterSupported = 90
    hipDeviceAttributeMemoryPoolSupportedHandleTypes = 91
    hipDeviceAttributeClockInstructionRate = 10000
    hipDeviceAttributeMaxSharedMemoryPerMultiprocessor = 10002
    hipDeviceAttributeHdpMemFlushCntl = 10005
    hipDeviceAttributeHdpRegFlushCntl = 10006
    hipDeviceAttributeCooperativeMultiDeviceUnmatchedFunc = 10007
    hipDeviceAttributeCooperativeMultiDeviceUnmatchedGridDim = 10008
    hipDeviceAttributeCooperativeMultiDeviceUnmatchedBlockDim = 10009
    hipDeviceAttributeCooperativeMultiDeviceUnmatchedSharedMem = 10010
    hipDeviceAttributeIsLargeBar = 10011
    hipDeviceAttributeAsicRevision = 10012
    hipDeviceAttributeCanUseStreamWaitValue = 10013
    hipDeviceAttributeImageSupport = 10014
    hipDeviceAttributePhysicalMultiProcessorCount = 10015
    hipDeviceAttributeFineGrainSupport = 10016
    hipDeviceAttributeWallClockRate = 10017

    # HIP's alias of the same value.
    hipDeviceAttributePciDomainID = 69


@dataclass
class hipDeviceProp_t:
    """``hipGetDeviceProperties``' answer: HIP's field names, one Python value each.

    ``maxThreadsDim`` and ``maxGridSize`` are 3-tuples; ``uuid`` is 16 bytes; ``name`` and
    ``gcnArchName`` are ``str``.  What each field holds on the host backend is in the
    README's "Device queries" table.
    """

    name: str = ""
    uuid: bytes = bytes(16)
    totalGlobalMem: int = 0
    sharedMemPerBlock: int = 0
    regsPerBlock: int = 0
    warpSize: int = 0
    memPitch: int = 0
    maxThreadsPerBlock: int = 0
    maxThreadsDim: tuple[int, int, int] = (0, 0, 0)
    maxGridSize: tuple[int, int, int] = (0, 0, 0)
    clockRate: int = 0
    totalConstMem: int = 0
    major: int = 0
    minor: int = 0
    textureAlignment: int = 0
    texturePitchAlignment: int = 0
    deviceOverlap: int = 0
    multiProcessorCount: int = 0
    kernelExecTimeoutEnabled: int = 0
    integrated: int = 0
    canMapHostMemory: int = 0
    computeMode: int = hipComputeModeDefault
    concurrentKernels: int = 0
    ECCEnabled: int = 0
    pciBusID: int = 0
    pciDeviceID: int = 0
    pciDomainID: int = 0
    tccDriver: int = 0
    asyncEngineCount: int = 0
    unifiedAddressing: int = 0
    memoryClockRate: int = 0
    memoryBusWidth: int = 0
    l2CacheSize: int = 0
    persistingL2CacheMaxSize: int = 0
    maxThreadsPerMultiProcessor: int = 0
    streamPrioritiesSupported: int = 0
    globalL1CacheSupported: int = 0
    localL1CacheSupported: int = 0
    sharedMemPerMultiprocessor: int = 0
    regsPerMultiprocessor: int = 0
    managedMemory: int = 0
    isMultiGpuBoard: int = 0
    multiGpuBoardGroupID: int = 0
    hostNativeAtomicSupported: int = 0
    singleToDoublePrecisionPerfRatio: int = 0
    pageableMemoryAccess: int = 0
    concurrentManagedAccess: int = 0
    computePreemptionSupported: int = 0
    canUseHostPointerForRegisteredMem: int = 0
    cooperativeLaunch: int = 0
    cooperativeMultiDeviceLaunch: int = 0
    sharedMemPerBlockOptin: int = 0
    pageableMemoryAccessUsesHostPageTables: int = 0
    directManagedMemAccessFromHost: int = 0
    maxBlocksPerMultiProcessor: int = 0
    accessPolicyMaxWindowSize: int = 0
    reservedSharedMemPerBlock: int = 0
    hostRegisterSupported: int = 0
    memoryPoolsSupported: int = 0
    memoryPoolSupportedHandleTypes: int = 0
    gcnArchName: str = ""
    clockInstructionRate: int = 0
    maxSharedMemoryPerMultiProcessor: int = 0
    isLargeBar: int = 0
    asicRevision: int = 0


@dataclass(frozen=True)
class hipPointerAttribute_t:
    """``hipPointerGetAttributes``' answer, HIP's fields plus the allocation's range.

    ``devicePointer``/``hostPointer`` are ints, 0 for HIP's ``nullptr`` (device memory from
    ``hipMalloc`` has no host pointer, as in HIP).  ``allocationBase``/``allocationSize`` are
    an extension (CUDA's ``CU_POINTER_ATTRIBUTE_RANGE_START_ADDR`` / ``RANGE_SIZE``): the
    allocation, import or host range that holds the pointer.
    """

    type: hipMemoryType
    device: int
    devicePointer: int
    hostPointer: int
    isManaged: int = 0
    allocationFlags: int = 0
    allocationBase: int = field(default=0, compare=False)
    allocationSize: int = field(default=0, compare=False)
