"""A three-stage pipeline passing a ring of buffers between processes, ordered by IPC events.

    producer (this process) --> transformer (process) --> consumer (process)
         ^                                                        |
         +------------------- slot free again --------------------+

The producer owns a ring of ``SLOTS`` buffers.  Each stage owns one interprocess event per
slot and records it on its stream when its work on that slot is done; the next stage makes
its own stream wait on that event (``hipStreamWaitEvent``) before touching the slot, and the
producer waits on the consumer's event before reusing a slot.  All waiting happens on the
streams: no process blocks on another's work.

Why the small pipe messages: CUDA's rule is that a wait applies to the most recent record *as
of the call*, so a stage must enqueue its wait after the previous stage enqueued its record.
Each stage therefore sends "item n recorded" (a few bytes, right after ``hipEventRecord``
returns, long before the work runs) and the next stage enqueues its wait when it reads that.
Data never goes through the pipes; only the 64-byte handles at start-up and item numbers.

Exits non-zero if the consumer sees a wrong or stale item, or any stage fails or hangs.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time

import numpy as np

import hipipc as hip

SLOTS = 4
ITEMS = 32
N = 1 << 18  # float32 per buffer: 1 MiB
TIMEOUT = 60.0
IPC_EVENT = hip.hipEventInterprocess | hip.hipEventDisableTiming


def produce(ptr: int, item: int) -> None:
    time.sleep(0.002)  # slow producer: readers must really wait for the event
    hip.asarray(ptr, N, np.float32)[:] = np.arange(N, dtype=np.float32) + item


def transform(ptr: int, item: int) -> None:
    data = hip.asarray(ptr, N, np.float32)
    data *= 2
    data += 1


def consume(ptr: int, item: int, results: list) -> None:
    data = hip.asarray(ptr, N, np.float32)
    expected = (np.arange(N, dtype=np.float32) + item) * 2 + 1
    results.append((item, bool(np.array_equal(data, expected))))


def _recv(conn, what: str):
    if not conn.poll(TIMEOUT):
        raise TimeoutError(f"no {what} within {TIMEOUT} s")
    return conn.recv()


def _open_ring(mem_handles: list[bytes]) -> list[int]:
    return [hip.hipIpcOpenMemHandle(h, hip.hipIpcMemLazyEnablePeerAccess) for h in mem_handles]


def transformer(upstream, downstream) -> None:
    """Stage 2: waits on the producer's events, records its own."""
    mem_handles, producer_events = _recv(upstream, "handles from the producer")
    ptrs = _open_ring(mem_handles)
    ready = [hip.hipIpcOpenEventHandle(h) for h in producer_events]
    mine = [hip.hipEventCreateWithFlags(IPC_EVENT) for _ in range(SLOTS)]
    downstream.send((mem_handles, [bytes(hip.hipIpcGetEventHandle(e)) for e in mine]))
    stream = hip.hipStreamCreate()
    while (item := _recv(upstream, "an item number")) is not None:
        slot = item % SLOTS
        hip.hipStreamWaitEvent(stream, ready[slot], 0)
        hip.hipLaunchHostFunc(stream, transform, ptrs[slot], item)
        hip.hipEventRecord(mine[slot], stream)
        downstream.send(item)
    hip.hipStreamSynchronize(stream)
    downstream.send(None)
    _recv(upstream, "the producer's goodbye")  # consumer done: our events are no longer used
    for ptr in ptrs:
        hip.hipIpcCloseMemHandle(ptr)
    for ev in ready + mine:
        hip.hipEventDestroy(ev)
    hip.hipStreamDestroy(stream)


def consumer(upstream, back_to_producer) -> None:
    """Stage 3: waits on the transformer's events, checks each item, frees the slot."""
    mem_handles, transformer_events = _recv(upstream, "handles from the transformer")
    ptrs = _open_ring(mem_handles)
    ready = [hip.hipIpcOpenEventHandle(h) for h in transformer_events]
    mine = [hip.hipEventCreateWithFlags(IPC_EVENT) for _ in range(SLOTS)]
    back_to_producer.send([bytes(hip.hipIpcGetEventHandle(e)) for e in mine])
    stream = hip.hipStreamCreate()
    results: list = []
    while (item := _recv(upstream, "an item number")) is not None:
        slot = item % SLOTS
        hip.hipStreamWaitEvent(stream, ready[slot], 0)
        hip.hipLaunchHostFunc(stream, consume, ptrs[slot], item, results)
        hip.hipEventRecord(mine[slot], stream)
        back_to_producer.send(item)
    hip.hipStreamSynchronize(stream)
    back_to_producer.send(("done", results))
    _recv(back_to_producer, "the producer's goodbye")
    for ptr in ptrs:
        hip.hipIpcCloseMemHandle(ptr)
    for ev in ready + mine:
        hip.hipEventDestroy(ev)
    hip.hipStreamDestroy(stream)


def run_pipeline() -> tuple[int, int]:
    """Returns (items verified by the consumer, items produced)."""
    ctx = mp.get_context("spawn")
    to_transformer, transformer_in = ctx.Pipe()
    transformer_out, consumer_in = ctx.Pipe()
    from_consumer, consumer_back = ctx.Pipe()
    procs = [
        ctx.Process(target=transformer, args=(transformer_in, transformer_out)),
        ctx.Process(target=consumer, args=(consumer_in, consumer_back)),
    ]
    ring = [hip.hipMalloc(N * 4) for _ in range(SLOTS)]
    mine = [hip.hipEventCreateWithFlags(IPC_EVENT) for _ in range(SLOTS)]
    stream = hip.hipStreamCreate()
    freed: list = []
    try:
        for p in procs:
            p.start()
        to_transformer.send(
            (
                [bytes(hip.hipIpcGetMemHandle(p)) for p in ring],
                [bytes(hip.hipIpcGetEventHandle(e)) for e in mine],
            )
        )
        freed = [hip.hipIpcOpenEventHandle(h) for h in _recv(from_consumer, "consumer events")]
        for item in range(ITEMS):
            slot = item % SLOTS
            if item >= SLOTS:
                # The consumer recorded its event for item - SLOTS before telling us.
                done = _recv(from_consumer, "a freed slot")
                if done != item - SLOTS:
                    raise RuntimeError(f"slot notices out of order: {done} for {item}")
                hip.hipStreamWaitEvent(stream, freed[slot], 0)
            hip.hipLaunchHostFunc(stream, produce, ring[slot], item)
            hip.hipEventRecord(mine[slot], stream)
            to_transformer.send(item)
        to_transformer.send(None)
        while not isinstance(msg := _recv(from_consumer, "the consumer's results"), tuple):
            pass  # the last SLOTS "slot free" notices
        results = msg[1]
        to_transformer.send("bye")
        from_consumer.send("bye")
        for p in procs:
            p.join(TIMEOUT)
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a stage failed: exit codes {[p.exitcode for p in procs]}")
        verified = sum(ok for _, ok in results)
        in_order = [item for item, _ in results] == list(range(ITEMS))
        return (verified if in_order else 0), ITEMS
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        hip.hipStreamSynchronize(stream)
        for ev in mine + freed:
            hip.hipEventDestroy(ev)
        hip.hipStreamDestroy(stream)
        for ptr in ring:
            hip.hipFree(ptr)


def main() -> int:
    t0 = time.perf_counter()
    verified, produced = run_pipeline()
    dt = time.perf_counter() - t0
    print(
        f"pipeline: {produced} items of {N * 4 >> 20} MiB through 3 processes and a ring of "
        f"{SLOTS} buffers in {dt:.2f} s; consumer verified {verified}/{produced}"
    )
    ok = verified == produced
    print("producer_consumer: PASSED" if ok else "producer_consumer: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
