"""A Python port of NVIDIA cuda-samples' ``streamOrderedAllocationIPC``
(Samples/2_Concepts_and_Techniques/streamOrderedAllocationIPC), on hipipc: the original's
structure and calls, renamed.

* The parent picks the devices as the original does: each must report memory pools
  (``hipDeviceAttributeMemoryPoolsSupported``) and a shareable handle type
  (``hipDeviceAttributeMemoryPoolSupportedHandleTypes``: a POSIX file descriptor here),
  ``hipComputeModeDefault``, and be a two-way peer of every device already picked (peer
  access is enabled both ways, as in the original).
* For each device the parent creates a ``hipStreamNonBlocking`` stream and an IPC pool
  (``hipMemPoolCreate`` with ``hipMemHandleTypePosixFileDescriptor``), allocates one buffer
  from it in stream order (``hipMallocFromPoolAsync``), exports the pool
  (``hipMemPoolExportToShareableHandle``: a descriptor) and the pointer
  (``hipMemPoolExportPointer``: 64 bytes of export data), then spawns one process per device.
* Once every child has started (a barrier, the original's ``barrierWait``), the parent sends
  each child all the pools' descriptors over a UNIX socket (``hipipc.send_fds``: SCM_RIGHTS,
  the original's ``ipcSendShareableHandles``), with the export data, and closes its copies.
* Each child imports every pool (``hipMemPoolImportFromShareableHandle``), makes sure its
  device has read-write access (``hipMemPoolGetAccess``/``SetAccess``), and imports a pointer
  from each pool by trying every export data until one succeeds (the others fail with
  ``hipErrorInvalidValue``: data of another pool, which ``hipGetLastError`` then resets).
  Round by round each child runs a "kernel" that fills the next buffer with its id, waits for
  it, and meets its siblings at a barrier; at the end it copies its own buffer to the host,
  checks that every byte holds the id of the sibling just after it, and frees every imported
  pointer in stream order (``hipFreeAsync``) before the parent frees them.
* The parent waits for the children, then frees each buffer in stream order on its stream
  (``hipFreeAsync``), synchronizes and destroys the pool.

Differences, all for checking: the kernel is a host function (``hipLaunchHostFunc``); the
parent also reads every buffer back after the children are done and checks the last round's
writer (the original only waits for the exit codes), and fills the buffers with 0xFF first
(pool memory starts zeroed, which is process 0's id); buffers are 1 MiB, not 64 MiB; every wait
is bounded.  Run with ``HIPIPC_HOST_DEVICES=4`` for four processes.  Exit code 0 when every
check passed, 1 when one failed, 2 (``EXIT_WAIVED``) when no device can take part.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
import time

import numpy as np

import hipipc as hip

MAX_DEVICES = 32
DATA_SIZE = 1 << 20  # the original moves 64 MiB per buffer; 1 MiB keeps the run short
TIMEOUT = 60.0  # seconds any barrier, message or the whole run may take
EXIT_WAIVED = 2
UNWRITTEN = 0xFF
EXPORT_SIZE = 64  # sizeof(hipMemPoolPtrExportData)


def simple_kernel(ptr: int, size: int, val: int) -> None:
    """``simpleKernel``: set every byte of the buffer to ``val``."""
    hip.asarray(ptr, size, np.uint8)[:] = val


def say(line: str) -> None:
    """Print ``line`` with one write, so that lines of concurrent processes never interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def child_process(
    id: int, devices: list[int], sock: socket.socket, start: mp.Barrier, step: mp.Barrier
) -> int:
    proc_count = len(devices)
    stream = None
    ptrs: list[int] = []
    pools: list[hip.hipMemPool_t] = []
    fds: list[int] = []
    try:
        start.wait(TIMEOUT)  # barrierWait(procCount + 1): everybody has started
        # Receive all the pools' shareable handles (and the export data) from the parent.
        data, fds = hip.recv_fds(sock, maxfds=proc_count, bufsize=4096, timeout=TIMEOUT)
        if len(fds) != proc_count or len(data) != proc_count * EXPORT_SIZE:
            say(f"process {id}: expected {proc_count} handles, got {len(fds)}")
            return 1
        export_data = [data[i * EXPORT_SIZE : (i + 1) * EXPORT_SIZE] for i in range(proc_count)]

        hip.hipSetDevice(devices[id])
        prop = hip.hipGetDeviceProperties(devices[id])
        stream = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)
        assert prop.multiProcessorCount >= 1  # the original sizes its grid with it

        # Import the pools from the shareable handles, then from each pool the pointer whose
        # export data belongs to it: try each until one succeeds.
        for i in range(proc_count):
            pools.append(
                hip.hipMemPoolImportFromShareableHandle(
                    fds[i], hip.hipMemHandleTypePosixFileDescriptor, 0
                )
            )
            location = hip.hipMemLocation(hip.hipMemLocationTypeDevice, devices[id])
            if hip.hipMemPoolGetAccess(pools[i], location) != hip.hipMemAccessFlagsProtReadWrite:
                desc = hip.hipMemAccessDesc(location, hip.hipMemAccessFlagsProtReadWrite)
                hip.hipMemPoolSetAccess(pools[i], [desc], 1)
            for j in range(proc_count):
                try:
                    ptrs.append(hip.hipMemPoolImportPointer(pools[i], export_data[j]))
                    break
                except hip.HipError:
                    hip.hipGetLastError()  # reset the failure for the next try
            # The pointers are imported: the shareable handle is no longer needed.
            os.close(fds[i])
            fds[i] = -1
        sock.close()
        if len(ptrs) != proc_count:
            say(f"process {id}: imported {len(ptrs)} of {proc_count} pointers")
            return 1

        # Each round every process fills the next buffer; the barrier keeps rounds apart.
        for i in range(proc_count):
            buffer_id = (i + id) % proc_count
            hip.hipLaunchHostFunc(stream, simple_kernel, ptrs[buffer_id], DATA_SIZE, id)
            err = hip.hipGetLastError()
            if err != hip.hipError_t.hipSuccess:
                raise hip.HipError(err, "kernel launch")
            hip.hipStreamSynchronize(stream, timeout=TIMEOUT)
            step.wait(TIMEOUT)
            if id == 0:
                say(f"Step {i} done")

        # Copy my buffer to the host and verify it.
        verification = np.empty(DATA_SIZE, np.uint8)
        hip.hipMemcpyAsync(verification, ptrs[id], DATA_SIZE, hip.hipMemcpyDeviceToHost, stream)
        hip.hipStreamSynchronize(stream, timeout=TIMEOUT)
        say(f"Process {id}: verifying...")
        compare_id = (id + 1) % proc_count
        wrong = np.flatnonzero(verification != compare_id)
        if wrong.size:
            say(
                f"Process {id}: Verification mismatch at {wrong[0]}: "
                f"{verification[wrong[0]]} != {compare_id} ({wrong.size} bytes)"
            )
            return 1
        say(f"Process {id}: buffer verified (every byte written by process {compare_id})")
        return 0
    finally:
        # Free the memory before the exporter frees it (stream-ordered), also on failure.
        if stream is not None:
            for ptr in ptrs:
                hip.hipFreeAsync(ptr, stream)
            hip.hipStreamSynchronize(stream, timeout=TIMEOUT)
            hip.hipStreamDestroy(stream)
        for pool in pools:
            hip.hipMemPoolDestroy(pool)
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        sock.close()
        say(f"Process {id} complete!")


def _child_main(*args: object) -> None:
    sys.exit(child_process(*args))  # type: ignore[arg-type]


def pick_devices() -> tuple[list[int], int]:
    """The original's device selection: (devices, the shareable handle type)."""
    devices: list[int] = []
    handle_type = hip.hipMemHandleTypeNone
    attr = hip.hipDeviceAttribute_t
    for i in range(hip.hipGetDeviceCount()):
        prop = hip.hipGetDeviceProperties(i)
        if not hip.hipDeviceGetAttribute(attr.hipDeviceAttributeMemoryPoolsSupported, i):
            say(f"Device {i} does not support memory pools, skipping...")
            continue
        supported = hip.hipDeviceGetAttribute(
            attr.hipDeviceAttributeMemoryPoolSupportedHandleTypes, i
        )
        if supported == 0:
            say(f"Device {i} does not support Memory pool based IPC, skipping...")
            continue
        if handle_type == hip.hipMemHandleTypeNone:
            if not supported & hip.hipMemHandleTypePosixFileDescriptor:
                say(f"Device {i} does not support any supported handle types, skipping...")
                continue
            handle_type = hip.hipMemHandleTypePosixFileDescriptor
        elif supported & handle_type != handle_type:
            say("Mixed handle types are not supported, waiving test")
            sys.exit(EXIT_WAIVED)
        # Two processes access each device, so exclusive or prohibited mode will not do.
        if prop.computeMode != hip.hipComputeModeDefault:
            say(f"Device {i} is in an unsupported compute mode for this sample")
            continue
        if all(
            hip.hipDeviceCanAccessPeer(d, i) and hip.hipDeviceCanAccessPeer(i, d) for d in devices
        ):
            for d in devices:  # not needed for IPC; it sets up the peers, as the original
                hip.hipSetDevice(i)
                hip.hipDeviceEnablePeerAccess(d, 0)
                hip.hipSetDevice(d)
                hip.hipDeviceEnablePeerAccess(i, 0)
            devices.append(i)
            if len(devices) >= MAX_DEVICES:
                break
        else:
            say(f"Device {i} is not peer capable with some other selected peers, skipping")
    return devices, handle_type


def main() -> int:
    devices, handle_type = pick_devices()
    if not devices:
        say("No devices support IPC")
        return EXIT_WAIVED
    if handle_type == hip.hipMemHandleTypeNone:
        say("No supported handle types found, waiving test")
        return EXIT_WAIVED
    nprocs = len(devices)
    say(f"streamOrderedAllocationIPC: {nprocs} device(s), one process each")
    streams: list[hip.Stream] = []
    pools: list[hip.hipMemPool_t] = []
    ptrs: list[int] = []
    shareable: list[int] = []
    export_data = b""
    failed = False
    ctx = mp.get_context("spawn")
    start, step = ctx.Barrier(nprocs + 1), ctx.Barrier(nprocs)
    try:
        # A pool per device, a buffer from each in stream order, and their exports.
        for device in devices:
            hip.hipSetDevice(device)
            streams.append(hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking))
            props = hip.hipMemPoolProps(
                allocType=hip.hipMemAllocationTypePinned,
                handleTypes=handle_type,
                location=hip.hipMemLocation(hip.hipMemLocationTypeDevice, device),
            )
            pools.append(hip.hipMemPoolCreate(props))
            ptrs.append(hip.hipMallocFromPoolAsync(DATA_SIZE, pools[-1], streams[-1]))
            # Not in the original: a fill no process writes, so a lost write cannot pass
            # (fresh pool memory is zero, which is process 0's id).
            hip.hipMemsetAsync(ptrs[-1], UNWRITTEN, DATA_SIZE, streams[-1])
            shareable.append(hip.hipMemPoolExportToShareableHandle(pools[-1], handle_type, 0))
            export_data += bytes(hip.hipMemPoolExportPointer(ptrs[-1]))

        for stream in streams:
            hip.hipStreamSynchronize(stream, timeout=TIMEOUT)
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in devices]
        procs = [
            ctx.Process(target=_child_main, args=(i, devices, pairs[i][1], start, step))
            for i in range(nprocs)
        ]
        for p in procs:
            p.start()
        for _, theirs in pairs:
            theirs.close()
        start.wait(TIMEOUT)
        # Send every pool's shareable handle (and every export data) to every child.
        for ours, _ in pairs:
            hip.send_fds(ours, shareable, export_data, timeout=TIMEOUT)
            ours.close()
        # The children hold their own descriptors now.
        for fd in shareable:
            os.close(fd)
        shareable.clear()

        deadline = time.monotonic() + TIMEOUT
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for i, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join(5)
                say(f"Process {i} timed out and was killed")
                failed = True
            elif p.exitcode != 0:
                say(f"Process {i} failed! (exit code {p.exitcode})")
                failed = True

        # The last round's writer of buffer b is the process just after b (hipipc's check).
        host = np.empty(DATA_SIZE, np.uint8)
        for b, ptr in enumerate(ptrs):
            hip.hipMemcpy(host, ptr, DATA_SIZE, hip.hipMemcpyDeviceToHost)
            if not (host == (b + 1) % nprocs).all():
                say(f"parent: buffer {b} does not hold process {(b + 1) % nprocs}'s writes")
                failed = True
    except (hip.HipError, OSError, TimeoutError, EOFError) as exc:
        say(f"parent: {exc}")
        failed = True
    finally:
        # Clean up, also after a failure: stream-ordered frees, then the pools.
        for fd in shareable:
            os.close(fd)
        for device, stream, ptr in zip(devices, streams, ptrs, strict=False):
            hip.hipSetDevice(device)
            hip.hipFreeAsync(ptr, stream)
        for stream in streams:
            hip.hipStreamSynchronize(stream, timeout=TIMEOUT)
            hip.hipStreamDestroy(stream)
        for pool in pools:
            hip.hipMemPoolDestroy(pool)
    say("streamOrderedAllocationIPC: FAILED" if failed else "streamOrderedAllocationIPC: PASSED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
