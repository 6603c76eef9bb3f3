"""A Python port of NVIDIA cuda-samples' ``simpleIPC``, on hipipc.

Structure of the original, kept here:

* the parent creates a shared struct (a :class:`hipipc.Mailbox`: a named POSIX shared-memory
  segment) with one slot per device for a 64-byte memory handle and a 64-byte event handle,
  plus a process-shared barrier, and spawns one process per device;
* each child selects its device, allocates a buffer and an interprocess event
  (``hipEventInterprocess | hipEventDisableTiming``), publishes both handles in its slot, and
  meets the others at the barrier;
* each child opens every sibling's memory and event, then, round by round, makes its stream
  wait (``hipStreamWaitEvent``) on the event of the buffer it is about to touch, which the
  previous round's writer (another process) recorded; runs a "kernel" that checks the previous
  writer's mark and writes its own id; records that buffer's event; and meets the others at the
  barrier;
* at the end each child verifies its own buffer, then closes, destroys and frees everything
  (also when a check failed, so nothing is left in the store); the parent unlinks the shared
  struct (the original leaks its shm segment; this port does not).

The "kernel" is a host function on the host backend (``hipLaunchHostFunc``).  It sleeps a
little before writing, so without the event wait the next round's reader would see stale data
and the check would fail.  Run with ``HIPIPC_HOST_DEVICES=4`` for four processes.  Exits non-zero
when a check fails.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time

import numpy as np

import hipipc as hip

CHUNK = 1 << 16  # bytes each round writes into a buffer
TIMEOUT = 60.0  # seconds any barrier or the whole run may take before it is a failure
UNWRITTEN = 0xFF


def kernel(ptr: int, rnd: int, writer: int, buffer_id: int, nprocs: int) -> None:
    """Check that round ``rnd - 1``'s writer finished with this buffer, then mark round ``rnd``."""
    if rnd > 0:
        # Buffer b is touched in round r by the process p with (p + r) % n == b.
        previous = (buffer_id - (rnd - 1)) % nprocs
        before = hip.asarray(ptr + (rnd - 1) * CHUNK, CHUNK, np.uint8)
        if not (before == previous).all():
            raise AssertionError(f"round {rnd}: buffer {buffer_id} was not finished by "
                                 f"process {previous} before process {writer} ran")
    time.sleep(0.005)  # a slow kernel: the next round must wait for it through the event
    hip.asarray(ptr + rnd * CHUNK, CHUNK, np.uint8)[:] = writer


def say(line: str) -> None:
    """Print ``line`` with one write, so that lines of concurrent processes never interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def child(rank: int, nprocs: int, mailbox_name: str) -> int:
    box = hip.Mailbox.attach(mailbox_name, timeout=TIMEOUT)
    stream = event = None
    ptr = 0
    imported: dict[int, tuple[int, object]] = {}  # sibling rank -> (pointer, event)

    def close_imports() -> None:
        while imported:
            _, (p, ev) = imported.popitem()
            hip.hipIpcCloseMemHandle(p)
            hip.hipEventDestroy(ev)

    try:
        hip.hipSetDevice(rank % hip.hipGetDeviceCount())
        stream = hip.hipStreamCreate()
        size = nprocs * CHUNK
        ptr = hip.hipMalloc(size)
        hip.hipMemset(ptr, UNWRITTEN, size)
        event = hip.hipEventCreateWithFlags(hip.hipEventDisableTiming | hip.hipEventInterprocess)
        box.put(rank, mem=hip.hipIpcGetMemHandle(ptr), event=hip.hipIpcGetEventHandle(event))
        box.wait(TIMEOUT)

        for i in range(nprocs):
            if i != rank:
                mem_handle, event_handle = box.get(i)
                imported[i] = (hip.hipIpcOpenMemHandle(mem_handle,
                                                       hip.hipIpcMemLazyEnablePeerAccess),
                               hip.hipIpcOpenEventHandle(event_handle))
        ptrs = [ptr if i == rank else imported[i][0] for i in range(nprocs)]
        events = [event if i == rank else imported[i][1] for i in range(nprocs)]
        box.wait(TIMEOUT)

        for rnd in range(nprocs):
            b = (rank + rnd) % nprocs
            hip.hipStreamWaitEvent(stream, events[b], 0)
            hip.hipLaunchHostFunc(stream, kernel, ptrs[b], rnd, rank, b, nprocs)
            hip.hipEventRecord(events[b], stream)
            box.wait(TIMEOUT)  # everyone has enqueued round rnd (and recorded its event)

        ok = True
        try:
            hip.hipStreamSynchronize(stream, timeout=TIMEOUT)
        except hip.HipError as exc:  # hipErrorLaunchFailure: a kernel's check failed
            say(f"process {rank}: {exc}")
            ok = False
        box.wait(TIMEOUT)  # every stream has drained: all buffers are final

        mine = hip.asarray(ptr, size, np.uint8).reshape(nprocs, CHUNK)
        expected = [(rank - r) % nprocs for r in range(nprocs)]
        verified = bool((mine == np.array(expected, np.uint8)[:, None]).all())
        del mine
        ok = ok and verified
        say(f"process {rank}: buffer {'verified' if verified else 'WRONG'} "
            f"(writers by round: {expected})")

        close_imports()
        box.wait(TIMEOUT)  # as in the original: nobody frees memory a sibling has open
        return 0 if ok else 1
    finally:
        # Also when something failed: close what we opened and free what we made, so that
        # nothing is left in the store.  (On this path a sibling may still have our memory
        # open; hipipc keeps its mapping valid until it closes, where CUDA leaves it undefined.)
        if stream is not None:
            try:
                hip.hipStreamSynchronize(stream, timeout=TIMEOUT)
            except hip.HipError:
                pass  # reported above, or the run is failing anyway
        close_imports()
        if event is not None:
            hip.hipEventDestroy(event)
        hip.hipFree(ptr)
        if stream is not None:
            hip.hipStreamDestroy(stream)
        box.close()


def _child_main(rank: int, nprocs: int, mailbox_name: str) -> None:
    sys.exit(child(rank, nprocs, mailbox_name))


def main() -> int:
    nprocs = hip.hipGetDeviceCount()
    say(f"simpleIPC: {nprocs} device(s), one process each")
    if nprocs < 2:
        say("note: with one device the single process only talks to itself; "
            "set HIPIPC_HOST_DEVICES=4 to see the exchange")
    ctx = mp.get_context("spawn")
    with hip.Mailbox.create(slots=nprocs, parties=nprocs) as box:
        procs = [ctx.Process(target=_child_main, args=(rank, nprocs, box.name))
                 for rank in range(nprocs)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + TIMEOUT
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        failed = False
        for rank, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join(5)
                say(f"process {rank}: timed out and was killed")
                failed = True
            elif p.exitcode != 0:
                say(f"process {rank}: failed (exit code {p.exitcode})")
                failed = True
    say("simpleIPC: FAILED" if failed else "simpleIPC: PASSED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
