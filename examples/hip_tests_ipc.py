"""A Python port of ROCm hip-tests' multiproc IPC tests, on hipipc: ``catch/multiproc/
hipIpcMemAccessTest.cc`` and ``hipIpcEventHandle.cc``, unchanged except for the Python syntax.

As in the originals: processes are ``fork``\\ ed before they start the runtime; the shared
structs (handles, device lists, a sense-reversing barrier) live in anonymous shared mappings
(``mmap(MAP_SHARED | MAP_ANONYMOUS)``, here ``mmap.mmap(-1, n)`` with ``ctypes`` structs over
it); the memory test hands over with two POSIX named semaphores (``posix_ipc``, the original's
``sem_open``); kernels are host functions (``hipLaunchHostFunc``) on the null stream.
``HIP_CHECK(call)`` is the call itself: a failing hip* call raises ``HipError``.

Where Python had to differ, and why:

* Every wait is bounded (``TIMEOUT``): a dead peer fails the test instead of hanging it.
* The semaphores get per-run names (``/my-sem-object1-<pid>``) instead of removing every
  ``/dev/shm/sem.my-sem-object*`` first (another run's semaphores).
* The barrier's ``__sync_add_and_fetch`` is an add under a process-shared POSIX semaphore:
  Python has no atomic add on shared memory.
* A forked child leaves with C's ``exit`` (exit handlers, then ``os._exit``: 0, or 1 when a
  check or a hip* call failed), and the parent checks that code: Catch2 reports a child's
  failure from the child itself.  A process that goes on after a failure frees what it
  allocated (the C test leaves that to its process exit).
* Out-parameter cases (``hipIpcGetMemHandle(nullptr, ptr)``...) do not exist in the Python
  form (results are returned) and are left out; so is destroying an event that a failed open
  never returned (uninitialized in C).
* ``Unit_hipIpcEventHandle_ParameterValidation``'s NVIDIA-only section runs too.

``HIPIPC_HOST_DEVICES`` sets the device count: the event test needs two devices and skips
with fewer, as the original does.  With three or more, ``Unit_hipIpcMemAccess_Semaphores``
enables one peer pair twice (its loop leaves the current device where the previous
iteration put it) and fails with ``hipErrorPeerAccessAlreadyEnabled``, as it would on HIP.
Prints one line per test and exits non-zero if any failed.
"""

from __future__ import annotations

import atexit
import ctypes
import mmap
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

import numpy as np
import posix_ipc

import hipipc as hip

TIMEOUT = 60.0
EXIT_SUCCESS, EXIT_FAILURE = 0, 1


class TestFailed(Exception):
    """A REQUIRE/HIP_ASSERT that did not hold."""


class Skipped(Exception):
    """The original's WARN(...) + return: the test does not apply here."""


def REQUIRE(cond: bool, what: str = "") -> None:
    if not cond:
        raise TestFailed(what or "REQUIRE failed")


def HIP_CHECK_ERROR(
    fn: Callable[..., object],
    *args: object,
    expected: hip.hipError_t,
    also: tuple[hip.hipError_t, ...] = (),
) -> None:
    """The call must fail with ``expected`` (or one of ``also``)."""
    try:
        fn(*args)
    except hip.HipError as exc:
        REQUIRE(
            exc.code in (expected, *also),
            f"{fn.__name__}: {exc.code.name}, expected {expected.name}",
        )
        return
    raise TestFailed(f"{fn.__name__} succeeded, expected {expected.name}")


def WARN(text: str) -> None:
    sys.stdout.write(f"  WARN: {text}\n")
    sys.stdout.flush()


def shared_struct(ctype: type[ctypes.Structure]) -> ctypes.Structure:
    """``mmap(NULL, sizeof(T), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, 0, 0)``."""
    region = mmap.mmap(-1, ctypes.sizeof(ctype))
    struct = ctype.from_buffer(region)
    struct._region = region  # keeps the mapping as long as the struct
    return struct


def exit(code: int) -> NoReturn:  # noqa: A001 - C's exit(), for forked children
    """C's ``exit(code)`` in a forked child: run the exit handlers (hipipc's among them
    revokes what this process exported), flush, and leave without unwinding into the code
    that forked (``sys.exit`` would)."""
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def child_exit(body: Callable[[], object]) -> NoReturn:
    """Run a forked child's part and ``exit``: 0, or 1 if it raised (Catch2 would report the
    failure from the child; the parent sees the code)."""
    code = EXIT_FAILURE
    try:
        body()
        code = EXIT_SUCCESS
    except BaseException:
        traceback.print_exc()
    finally:
        exit(code)


def waitpid(pid: int, timeout: float = TIMEOUT) -> int:
    """``waitpid(pid, &status, 0)``, bounded: the child is killed past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise TestFailed(f"child {pid} did not finish in {timeout:.0f} s")
        time.sleep(0.005)


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited (a zombie not yet waited for), without reaping it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


def sem_wait(sem: posix_ipc.Semaphore, peer: int | None = None) -> int:
    """``sem_wait``, bounded by ``TIMEOUT`` and, when ``peer`` (a child) is given, by its
    life: -1 (the original's failure path) if it exits without posting."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            sem.acquire(0.05 if peer is not None else TIMEOUT)
            return 0
        except posix_ipc.BusyError:
            if peer is None or _exited(peer) or time.monotonic() > deadline:
                return -1


def sem_post(sem: posix_ipc.Semaphore) -> int:
    try:
        sem.release()
        return 0
    except posix_ipc.Error:
        return -1


# ======================= catch/multiproc/hipIpcMemAccessTest.cc ==========================

NUM_ELMTS = 1024


class hip_ipc_t(ctypes.Structure):
    _fields_ = [
        ("device", ctypes.c_int),
        ("memHandle", ctypes.c_ubyte * 64),
        ("IfTestPassed", ctypes.c_bool),
    ]


def checkTest(expected: np.ndarray, actual: np.ndarray, n: int) -> None:
    wrong = np.flatnonzero(expected[:n] != actual[:n])
    REQUIRE(
        not wrong.size, f"mismatch at {wrong[:1]}: {actual[wrong[:1]]} != {expected[wrong[:1]]}"
    )


def Unit_hipIpcMemAccess_Semaphores() -> None:
    N = 1024
    Nbytes = N * np.dtype(np.int32).itemsize
    name1, name2 = f"/my-sem-object1-{os.getpid()}", f"/my-sem-object2-{os.getpid()}"
    sem_ob1 = posix_ipc.Semaphore(name1, posix_ipc.O_CREX, 0o660, 0)
    sem_ob2 = posix_ipc.Semaphore(name2, posix_ipc.O_CREX, 0o660, 0)
    try:
        shrd_mem = shared_struct(hip_ipc_t)
        shrd_mem.IfTestPassed = True
        # HipTest::initArrays: A_h[i] = 3.146f + i (as int), C_h zeroed
        A_h = (np.arange(N) + 3).astype(np.int32)
        C_h = np.zeros(N, np.int32)
        pid = os.fork()
        if pid != 0:
            try:
                # Parent process
                A_d = 0
                Num_devices = hip.hipGetDeviceCount()
                for i in range(Num_devices):
                    if shrd_mem.IfTestPassed:
                        hip.hipSetDevice(i)
                        A_d = hip.hipMalloc(Nbytes)
                        shrd_mem.memHandle[:] = bytes(hip.hipIpcGetMemHandle(A_d))
                        hip.hipMemcpy(A_d, A_h, Nbytes, hip.hipMemcpyHostToDevice)
                        shrd_mem.device = i
                        if sem_post(sem_ob1) == -1:
                            shrd_mem.IfTestPassed = False
                            WARN("sem_post() call failed in parent process.")
                        if sem_wait(sem_ob2, pid) == -1:
                            shrd_mem.IfTestPassed = False
                            WARN("sem_wait() call failed in parent process.")
                        hip.hipFree(A_d)
                        A_d = 0
            except BaseException:
                os.kill(pid, 9)  # do not leave the child waiting on the semaphores
                os.waitpid(pid, 0)
                if A_d:
                    hip.hipFree(A_d)  # the C test leaves this to its process exit
                raise
        else:

            def child() -> None:
                # Child process
                Num_devices = hip.hipGetDeviceCount()
                for j in range(Num_devices):
                    hip.hipSetDevice(j)
                    if sem_wait(sem_ob1) == -1:
                        shrd_mem.IfTestPassed = False
                        WARN("sem_wait() call failed in child process.")
                        if sem_post(sem_ob2) == -1:
                            shrd_mem.IfTestPassed = False
                            WARN("sem_post() call on sem_ob2 failed")
                            exit(1)
                    for i in range(Num_devices):
                        CanAccessPeer = hip.hipDeviceCanAccessPeer(i, shrd_mem.device)
                        if CanAccessPeer == 1:
                            hip.hipDeviceEnablePeerAccess(i, 0)
                            hip.hipSetDevice(i)
                            C_d = hip.hipMalloc(Nbytes)
                            B_d = hip.hipIpcOpenMemHandle(
                                bytes(shrd_mem.memHandle), hip.hipIpcMemLazyEnablePeerAccess
                            )
                            hip.hipMemcpy(C_d, B_d, Nbytes, hip.hipMemcpyDeviceToDevice)
                            hip.hipMemcpy(C_h, C_d, Nbytes, hip.hipMemcpyDeviceToHost)
                            checkTest(A_h, C_h, N)
                            C_h[:] = 0
                            # Checking if the data obtained from Ipc shared memory is consistent
                            hip.hipMemcpy(C_h, B_d, Nbytes, hip.hipMemcpyDeviceToHost)
                            checkTest(A_h, C_h, N)
                            hip.hipIpcCloseMemHandle(B_d)
                            hip.hipFree(C_d)
                    if sem_post(sem_ob2) == -1:
                        shrd_mem.IfTestPassed = False
                        WARN("sem_post() call on sem_ob2 failed")
                        exit(1)

            child_exit(child)
    finally:
        for name in (name1, name2):
            try:
                posix_ipc.unlink_semaphore(name)
            except posix_ipc.ExistentialError:
                WARN(f"sem_unlink() call on {name} failed")
        sem_ob1.close()
        sem_ob2.close()
    rFlag = waitpid(pid)
    REQUIRE(os.waitstatus_to_exitcode(rFlag) == 0, "the child process failed")
    REQUIRE(shrd_mem.IfTestPassed)


def Unit_hipIpcMemAccess_ParameterValidation() -> None:
    Ad = hip.hipMalloc(1024)
    MemHandleUninit = bytes(64)  # C: an uninitialized stack struct; here all zeros
    try:
        # "Get mem handle with handle as nullptr": no out-parameter in the Python form.
        # Get mem handle with devptr as nullptr (and handle/devptr as nullptr)
        HIP_CHECK_ERROR(hip.hipIpcGetMemHandle, None, expected=hip.hipError_t.hipErrorInvalidValue)
        HIP_CHECK_ERROR(hip.hipIpcGetMemHandle, 0, expected=hip.hipError_t.hipErrorInvalidValue)
        # Get mem handle with valid devptr
        MemHandle = hip.hipIpcGetMemHandle(Ad)
        # "Open mem handle with devptr as nullptr": no out-parameter.
        # Open mem handle with handle as un-initialized
        HIP_CHECK_ERROR(
            hip.hipIpcOpenMemHandle,
            MemHandleUninit,
            hip.hipIpcMemLazyEnablePeerAccess,
            expected=hip.hipError_t.hipErrorInvalidValue,
            also=(hip.hipError_t.hipErrorInvalidDevicePointer,),
        )
        # Open mem handle with flags as random value
        flags = 123
        MemHandle = hip.hipIpcGetMemHandle(Ad)
        HIP_CHECK_ERROR(
            hip.hipIpcOpenMemHandle, MemHandle, flags, expected=hip.hipError_t.hipErrorInvalidValue
        )
        # Close mem handle with devptr(nullptr)
        HIP_CHECK_ERROR(
            hip.hipIpcCloseMemHandle, None, expected=hip.hipError_t.hipErrorInvalidValue
        )
        HIP_CHECK_ERROR(hip.hipIpcCloseMemHandle, 0, expected=hip.hipError_t.hipErrorInvalidValue)
    finally:
        hip.hipFree(Ad)


# ======================== catch/multiproc/hipIpcEventHandle.cc ===========================

BUF_SIZE = 4096
MAX_DEVICES = 16


class ipcEventInfo_t(ctypes.Structure):
    _fields_ = [
        ("device", ctypes.c_int),
        ("pid", ctypes.c_int),
        ("eventHandle", ctypes.c_ubyte * 64),
        ("memHandle", ctypes.c_ubyte * 64),
    ]


class ipcDevices_t(ctypes.Structure):
    _fields_ = [("count", ctypes.c_int), ("ordinals", ctypes.c_int * MAX_DEVICES)]


class ipcBarrier_t(ctypes.Structure):
    _fields_ = [("count", ctypes.c_int), ("sense", ctypes.c_bool), ("allExit", ctypes.c_bool)]


def getDevices(devices: ipcDevices_t) -> None:
    """Get device count and list devices with P2P access with device 0 (in a child, so that
    this process does not start the runtime)."""
    pid = os.fork()
    if not pid:

        def child() -> None:
            devCnt = hip.hipGetDeviceCount()
            if devCnt < 2:
                devices.count = 0
                WARN("Count less than expected number of devices")
                return
            devices.ordinals[0] = 0  # Device 0
            devices.count = 1
            # Check possibility for peer accesses, relevant to our tests
            for i in range(1, devCnt):
                canPeerAccess_0i = hip.hipDeviceCanAccessPeer(0, i)
                canPeerAccess_i0 = hip.hipDeviceCanAccessPeer(i, 0)
                if canPeerAccess_0i * canPeerAccess_i0:
                    devices.ordinals[i] = i
                    devices.count += 1

        child_exit(child)
    status = waitpid(pid)
    REQUIRE(status == 0, "getDevices' child failed")  # HIP_ASSERT(!status)


g_Barrier: ipcBarrier_t
g_BarrierLock: posix_ipc.Semaphore  # stands for __sync_add_and_fetch's atomicity
g_procSense = False
g_processCnt = 0
g_index = 0  # this process's index (0: the process that forked the others)


def processBarrier() -> None:
    """Calling process waits for other processes to signal/complete."""
    global g_procSense
    try:
        g_BarrierLock.acquire(TIMEOUT)
    except posix_ipc.BusyError:
        barrier_failed()
    try:
        g_Barrier.count += 1
        newCount = g_Barrier.count
    finally:
        g_BarrierLock.release()
    if newCount == g_processCnt:
        g_Barrier.count = 0
        g_Barrier.sense = not g_procSense
    else:
        deadline = time.monotonic() + TIMEOUT
        while g_Barrier.sense == g_procSense:
            if not g_Barrier.allExit and time.monotonic() < deadline:
                os.sched_yield()
            else:
                barrier_failed()
    g_procSense = not g_procSense


def barrier_failed() -> None:
    """The original's ``exit(EXIT_FAILURE)`` when a process gave up (``allExit``); process 0,
    this script's own process, reports the failure and cleans up instead."""
    if g_index != 0:
        exit(EXIT_FAILURE)
    raise TestFailed("another process failed or timed out (allExit, or a barrier timed out)")


def computeKernel(dst: int, src: int, num: int) -> None:
    """dst[idx] = src[idx] / num, for every idx of the grid (BUF_SIZE threads)."""
    d = hip.asarray(dst, BUF_SIZE, np.int32)
    d[:] = hip.asarray(src, BUF_SIZE, np.int32) // num  # non-negative: C's / truncates alike


def runMultiProcKernel(shmEventInfo: ctypes.Array, index: int) -> None:
    """1) Process 0 allocates a buffer in GPU0 memory and exports the memory handle.
    2) Other processes open the memory handle, compute and record their event.
    3) Process 0 synchronizes the events and validates the resulting buffer."""
    itemsize = np.dtype(np.int32).itemsize
    # Randomize data before computation (rand_r seeded with the time)
    hData = np.random.default_rng(time.time_ns()).integers(0, 2**31 - 1, BUF_SIZE, dtype=np.int32)
    hip.hipSetDevice(shmEventInfo[index].device)

    if index == 0:
        event: list[hip.Event | None] = [None] * MAX_DEVICES
        d_ptr = hip.hipMalloc(BUF_SIZE * g_processCnt * itemsize)
        try:
            shmEventInfo[0].memHandle[:] = bytes(hip.hipIpcGetMemHandle(d_ptr))
            hip.hipMemcpy(d_ptr, hData, BUF_SIZE * itemsize, hip.hipMemcpyHostToDevice)

            # Barrier 1: process 0 waits for all processes to create event handles,
            # signals device memory creation.
            processBarrier()
            for i in range(1, g_processCnt):
                event[i] = hip.hipIpcOpenEventHandle(bytes(shmEventInfo[i].eventHandle))

            # Barrier 2: process 0 waits for kernels to be launched and the events recorded.
            processBarrier()
            for i in range(1, g_processCnt):
                hip.hipEventSynchronize(event[i])
            h_results = np.empty(BUF_SIZE * MAX_DEVICES, np.int32)
            hip.hipMemcpy(
                h_results,
                d_ptr + BUF_SIZE * itemsize,
                BUF_SIZE * (g_processCnt - 1) * itemsize,
                hip.hipMemcpyDeviceToHost,
            )

            # Barrier 3: process 0 signals event usage is done.
            processBarrier()
            hip.hipFree(d_ptr)
        except BaseException:
            # Clean up what the C test leaves to its process exit: this process goes on.
            for ev in event:
                if ev is not None:
                    hip.hipEventDestroy(ev)
            if d_ptr:
                try:
                    hip.hipFree(d_ptr)
                except hip.HipError:
                    pass  # freed already
            raise
        for n in range(1, g_processCnt):
            expected = hData // (n + 1)
            got = h_results[(n - 1) * BUF_SIZE : n * BUF_SIZE]
            if not (expected == got).all():
                WARN(f"Data validation error at index {np.flatnonzero(expected != got)[0]} n{n}")
                g_Barrier.allExit = True
                raise TestFailed("data validation")
        for i in range(1, g_processCnt):
            hip.hipEventDestroy(event[i])
    else:
        ev = hip.hipEventCreateWithFlags(hip.hipEventDisableTiming | hip.hipEventInterprocess)
        shmEventInfo[index].eventHandle[:] = bytes(hip.hipIpcGetEventHandle(ev))

        # Barrier 1: wait until process 0 initializes device memory, signals event creation.
        processBarrier()
        d_ptr = hip.hipIpcOpenMemHandle(
            bytes(shmEventInfo[0].memHandle), hip.hipIpcMemLazyEnablePeerAccess
        )
        hip.hipLaunchHostFunc(
            0, computeKernel, d_ptr + index * BUF_SIZE * itemsize, d_ptr, index + 1
        )
        err = hip.hipGetLastError()
        if err != hip.hipError_t.hipSuccess:
            raise hip.HipError(err, "computeKernel launch")
        hip.hipEventRecord(ev)

        # Barrier 2: signals that the event is recorded.
        processBarrier()
        hip.hipIpcCloseMemHandle(d_ptr)

        # Barrier 3: wait for all the events to be used up by processes.
        processBarrier()
        hip.hipEventDestroy(ev)


def Unit_hipIpcEventHandle_Functional() -> None:
    global g_Barrier, g_BarrierLock, g_procSense, g_processCnt, g_index
    shmDevices = shared_struct(ipcDevices_t)
    getDevices(shmDevices)
    if shmDevices.count < 2:
        raise Skipped("Test requires atleast two GPUs with P2P access. Skipping test.")
    g_processCnt = min(shmDevices.count, MAX_DEVICES)

    # Barrier is used to synchronize processes created.
    g_Barrier = shared_struct(ipcBarrier_t)
    lock_name = f"/hip-tests-barrier-{os.getpid()}"
    g_BarrierLock = posix_ipc.Semaphore(lock_name, posix_ipc.O_CREX, 0o600, 1)
    posix_ipc.unlink_semaphore(lock_name)  # forked children inherit it; no name stays
    g_procSense = False

    # Shared memory for event and memHandle info
    shmEventInfo = (ipcEventInfo_t * g_processCnt).from_buffer(
        mmap.mmap(-1, g_processCnt * ctypes.sizeof(ipcEventInfo_t))
    )

    index = 0
    for i in range(1, g_processCnt):
        pid = os.fork()
        if not pid:
            index = i
            break
        shmEventInfo[i].pid = pid

    g_index = index
    shmEventInfo[index].device = shmDevices.ordinals[index]

    def run() -> None:
        try:
            runMultiProcKernel(shmEventInfo, index)
        except BaseException:
            g_Barrier.allExit = True  # release the others (the original's exit path)
            raise

    if index != 0:
        child_exit(run)

    # Run the test, then clean up
    try:
        run()
    finally:
        failed = []
        for i in range(1, g_processCnt):
            status = waitpid(shmEventInfo[i].pid)
            if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
                failed.append(i)
        g_BarrierLock.close()
    REQUIRE(not failed, f"process(es) {failed} failed")


def Unit_hipIpcEventHandle_ParameterValidation() -> None:
    E = hip.hipError_t
    event = hip.hipEventCreateWithFlags(hip.hipEventDisableTiming | hip.hipEventInterprocess)
    # "Get event handle with eventHandle(nullptr)": no out-parameter in the Python form.
    # Get event handle with event(nullptr), handle and event nullptr, an invalid event object
    HIP_CHECK_ERROR(hip.hipIpcGetEventHandle, None, expected=E.hipErrorInvalidValue)
    # Get event handle for event allocated without Interprocess flag
    eventNoIpc = hip.hipEventCreateWithFlags(hip.hipEventDisableTiming)
    HIP_CHECK_ERROR(
        hip.hipIpcGetEventHandle,
        eventNoIpc,
        expected=E.hipErrorInvalidResourceHandle,
        also=(E.hipErrorInvalidConfiguration,),
    )
    # "Open event handle with event(nullptr)": no out-parameter.
    # Open event handle with eventHandle as invalid
    ipc_handle = bytes(64)
    HIP_CHECK_ERROR(
        hip.hipIpcOpenEventHandle,
        ipc_handle,
        expected=E.hipErrorInvalidValue,
        also=(E.hipErrorMapFailed,),
    )
    # Open handle in process that created it
    event1 = hip.hipEventCreateWithFlags(hip.hipEventDisableTiming | hip.hipEventInterprocess)
    event_handle = hip.hipIpcGetEventHandle(event1)
    HIP_CHECK_ERROR(hip.hipIpcOpenEventHandle, event_handle, expected=E.hipErrorInvalidContext)
    hip.hipEventDestroy(event1)
    # Event created with no flags (NVIDIA-only in the original)
    ev = hip.hipEventCreate()
    HIP_CHECK_ERROR(
        hip.hipIpcGetEventHandle,
        ev,
        expected=E.hipErrorInvalidResourceHandle,
        also=(E.hipErrorInvalidConfiguration,),
    )
    hip.hipEventDestroy(ev)
    hip.hipEventDestroy(eventNoIpc)
    hip.hipEventDestroy(event)


TESTS = [
    Unit_hipIpcEventHandle_Functional,
    Unit_hipIpcMemAccess_Semaphores,
    Unit_hipIpcMemAccess_ParameterValidation,
    Unit_hipIpcEventHandle_ParameterValidation,
]


def main() -> int:
    failed = 0
    for test in TESTS:
        try:
            test()
            result = "PASSED"
        except Skipped as why:
            result = f"SKIPPED ({why})"
        except Exception as exc:  # a failed REQUIRE or hip* call: report it, run the rest
            traceback.print_exc()
            result = f"FAILED ({type(exc).__name__}: {exc})"
            failed += 1
        sys.stdout.write(f"{test.__name__}: {result}\n")
        sys.stdout.flush()
    sys.stdout.write(f"hip_tests_ipc: {'FAILED' if failed else 'PASSED'}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
