"""A Python port of NVIDIA cuda-samples' ``simpleIPC`` (Samples/0_Introduction/simpleIPC), on
hipipc: the original's structure and calls, renamed.

* The parent picks the devices as the original does: each must report ``unifiedAddressing``
  and ``hipComputeModeDefault`` (``hipGetDeviceProperties``) and be a two-way peer
  (``hipDeviceCanAccessPeer``) of every device already picked; peer access is enabled both
  ways (``hipDeviceEnablePeerAccess``), which IPC does not need but the original does anyway.
* The parent allocates every buffer and every interprocess event
  (``hipEventDisableTiming | hipEventInterprocess``), one per device, and publishes their
  handles in a shared struct (a :class:`hipipc.Mailbox`, the original's ``shmStruct``), then
  spawns one process per device.
* Each child opens *all* the buffers and events (none is its own), creates a
  ``hipStreamNonBlocking`` stream, and round by round: makes the stream wait
  (``hipStreamWaitEvent``) on the event of the buffer it is about to touch, launches a
  "kernel" that overwrites that whole buffer with its id, records the buffer's event, and
  meets its siblings at a barrier.
* At the end each child waits on its own buffer's event, copies the buffer to the host with
  ``hipMemcpyAsync`` on its stream, synchronizes, and checks that every byte holds the id of
  the sibling just after it (the last round's writer).  The parent then synchronizes,
  destroys and frees everything, and unlinks the struct (the original leaks it).

Differences, all for checking: the host backend's kernel is a host function
(``hipLaunchHostFunc``) that, before it overwrites a buffer, checks that the previous round's
writer finished it, and sleeps a little first, so a missing event wait fails the run; the
parent fills the buffers with 0xFF so round 0 has something to check; buffers are 1 MiB, not
64 MiB; every wait is bounded.  Run with ``HIPIPC_HOST_DEVICES=4`` for four processes.  Exit
code 0 when every check passed, 1 when one failed, 2 (the original's ``EXIT_WAIVED``) when no
device can take part.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time

import numpy as np

import hipipc as hip

MAX_DEVICES = 32
DATA_SIZE = 1 << 20  # the original moves 64 MiB per buffer; 1 MiB keeps the run short
TIMEOUT = 60.0  # seconds any barrier or the whole run may take before it is a failure
UNWRITTEN = 0xFF
EXIT_WAIVED = 2


def kernel(ptr: int, rnd: int, writer: int, buffer_id: int, nprocs: int) -> None:
    """``simpleKernel``: set the whole buffer to ``writer``, after checking that the writer of
    round ``rnd - 1`` (another process) had finished it."""
    buf = hip.asarray(ptr, DATA_SIZE, np.uint8)
    # Buffer b is touched in round r by the process p with (p + r) % n == b.
    previous = (buffer_id - (rnd - 1)) % nprocs if rnd > 0 else UNWRITTEN
    if not (buf == previous).all():
        who = f"process {previous}" if rnd > 0 else "the parent's fill"
        raise AssertionError(
            f"round {rnd}: buffer {buffer_id} was not finished by {who} before process {writer} ran"
        )
    time.sleep(0.005)  # a slow kernel: the next round must wait for it through the event
    buf[:] = writer


def say(line: str) -> None:
    """Print ``line`` with one write, so that lines of concurrent processes never interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def child_process(id: int, devices: list[int], mailbox_name: str) -> int:
    box = hip.Mailbox.attach(mailbox_name, timeout=TIMEOUT)
    proc_count = len(devices)
    stream = None
    ptrs: list[int] = []
    events: list[hip.Event] = []
    try:
        hip.hipSetDevice(devices[id])
        prop = hip.hipGetDeviceProperties(devices[id])
        stream = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)
        # The original sizes its grid as occupancy x multiProcessorCount; a host-backend
        # kernel is one host function, so the count is only read here.
        assert prop.multiProcessorCount >= 1

        # Open and track all the allocations and events created in the parent process.
        for i in range(proc_count):
            mem_handle, event_handle = box.get(i)
            ptrs.append(hip.hipIpcOpenMemHandle(mem_handle, hip.hipIpcMemLazyEnablePeerAccess))
            events.append(hip.hipIpcOpenEventHandle(event_handle))

        # Each round every process works on the next buffer; the stream waits (in stream
        # order, through the IPC event) for the previous round's writer of that buffer.
        for i in range(proc_count):
            buffer_id = (i + id) % proc_count
            hip.hipStreamWaitEvent(stream, events[buffer_id], 0)
            hip.hipLaunchHostFunc(stream, kernel, ptrs[buffer_id], i, id, buffer_id, proc_count)
            err = hip.hipGetLastError()
            if err != hip.hipError_t.hipSuccess:
                raise hip.HipError(err, "kernel launch")
            hip.hipEventRecord(events[buffer_id], stream)
            # Everybody has enqueued this round (and recorded its event) before anybody
            # moves on, so nobody waits on the wrong record.
            box.wait(TIMEOUT)
            if id == 0:
                say(f"Step {i} done")

        # Wait for my buffer to be ready, copy it to the host and verify it.
        verification = np.empty(DATA_SIZE, np.uint8)
        hip.hipStreamWaitEvent(stream, events[id], 0)
        hip.hipMemcpyAsync(verification, ptrs[id], DATA_SIZE, hip.hipMemcpyDeviceToHost, stream)
        ok = True
        try:
            hip.hipStreamSynchronize(stream, timeout=TIMEOUT)
        except hip.HipError as exc:  # hipErrorLaunchFailure: a kernel's check failed
            say(f"process {id}: {exc}")
            ok = False
        # The contents should be the id of the sibling just after me.
        compare_id = (id + 1) % proc_count
        wrong = np.flatnonzero(verification != compare_id)
        if wrong.size:
            say(
                f"process {id}: buffer WRONG ({wrong.size} of {DATA_SIZE} bytes differ from "
                f"{compare_id}, the first at {wrong[0]}: {verification[wrong[0]]})"
            )
        else:
            say(f"process {id}: buffer verified (every byte written by process {compare_id})")
        return 0 if ok and not wrong.size else 1
    finally:
        # Also when something failed: close what we opened, so nothing is left behind.
        if stream is not None:
            try:
                hip.hipStreamSynchronize(stream, timeout=TIMEOUT)
            except hip.HipError:
                pass  # reported above, or the run is failing anyway
        for ptr in ptrs:
            hip.hipIpcCloseMemHandle(ptr)
        for event in events:
            hip.hipEventDestroy(event)
        if stream is not None:
            hip.hipStreamDestroy(stream)
        box.close()


def _child_main(id: int, devices: list[int], mailbox_name: str) -> None:
    sys.exit(child_process(id, devices, mailbox_name))


def pick_devices() -> list[int]:
    """The original's device selection and peer-access preamble."""
    devices: list[int] = []
    for i in range(hip.hipGetDeviceCount()):
        prop = hip.hipGetDeviceProperties(i)
        # IPC is only supported on devices with unified addressing.
        if not prop.unifiedAddressing:
            say(f"Device {i} does not support unified addressing, skipping...")
            continue
        # Two processes access each device, so exclusive or prohibited mode will not do.
        if prop.computeMode != hip.hipComputeModeDefault:
            say(f"Device {i} is in an unsupported compute mode for this sample")
            continue
        if all(
            hip.hipDeviceCanAccessPeer(d, i) and hip.hipDeviceCanAccessPeer(i, d) for d in devices
        ):
            # Not needed for IPC, but it sets up the peers, as the original does.
            for d in devices:
                hip.hipSetDevice(i)
                hip.hipDeviceEnablePeerAccess(d, 0)
                hip.hipSetDevice(d)
                hip.hipDeviceEnablePeerAccess(i, 0)
            devices.append(i)
            if len(devices) >= MAX_DEVICES:
                break
        else:
            say(f"Device {i} is not peer capable with some other selected peers, skipping")
    return devices


def main() -> int:
    devices = pick_devices()
    if not devices:
        say("No devices support IPC")
        return EXIT_WAIVED
    nprocs = len(devices)
    say(f"simpleIPC: {nprocs} device(s), one process each")
    if nprocs < 2:
        say(
            "note: with one device the single process only talks to itself; "
            "set HIPIPC_HOST_DEVICES=4 to see the exchange"
        )
    ptrs: list[int] = []
    events: list[hip.Event] = []
    failed = False
    with hip.Mailbox.create(slots=nprocs, parties=nprocs) as box:
        try:
            # Allocate memory and an event for each process and publish their handles.
            for i, device in enumerate(devices):
                hip.hipSetDevice(device)
                ptrs.append(hip.hipMalloc(DATA_SIZE))
                hip.hipMemset(ptrs[-1], UNWRITTEN, DATA_SIZE)
                events.append(
                    hip.hipEventCreateWithFlags(
                        hip.hipEventDisableTiming | hip.hipEventInterprocess
                    )
                )
                box.put(
                    i,
                    mem=hip.hipIpcGetMemHandle(ptrs[-1]),
                    event=hip.hipIpcGetEventHandle(events[-1]),
                )

            ctx = mp.get_context("spawn")
            procs = [
                ctx.Process(target=_child_main, args=(i, devices, box.name)) for i in range(nprocs)
            ]
            for p in procs:
                p.start()
            deadline = time.monotonic() + TIMEOUT
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            for i, p in enumerate(procs):
                if p.is_alive():
                    p.kill()
                    p.join(5)
                    say(f"process {i}: timed out and was killed")
                    failed = True
                elif p.exitcode != 0:
                    say(f"process {i}: failed (exit code {p.exitcode})")
                    failed = True
        finally:
            # Clean up, also after a failure.
            for device, event in zip(devices, events, strict=False):  # events may be fewer
                hip.hipSetDevice(device)
                try:
                    hip.hipEventSynchronize(event, timeout=TIMEOUT)
                except hip.HipError as exc:  # a child died before its work completed
                    say(f"parent: {exc}")
                    failed = True
                hip.hipEventDestroy(event)
            for ptr in ptrs:
                hip.hipFree(ptr)
    say("simpleIPC: FAILED" if failed else "simpleIPC: PASSED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
