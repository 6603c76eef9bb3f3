"""IPC event benchmark: wake-up latency across processes and the cost of enqueueing.

Cases (issue 3's and issue 15's targets in brackets):
  wake-up: from the completion of an IPC event's recorded work in one process to the return
      of hipEventSynchronize in another, against, measured the same way in the same run:
      a posix_ipc.Semaphore released by a host function enqueued on the same stream right
      after the same work (the same process structure: the completing stream worker wakes a
      waiter in another process) [<= 1.2x, unpinned and pinned]; a posix_ipc.Semaphore
      released by the sender's main thread (the kernel's floor, without the stream hop); and
      the one-way latency of a multiprocessing.Pipe message [<= 1x, pinned].  In every method
      the receiver is already asleep when the sender acts (the sender pauses 1 ms first); both
      stamps come from time.perf_counter_ns (CLOCK_MONOTONIC, one clock for all).  Measured
      unpinned, then with sender and receiver pinned to two different CPUs (a cross-CPU
      wake-up, far less noisy), each in alternating rounds (event block, semaphore blocks,
      pipe block; the order reversed every other round): a figure is the median of the
      rounds' medians, a ratio the median of the rounds' ratios.
  enqueue: the per-operation cost of hipLaunchHostFunc, hipMemcpyAsync (4 KiB), hipEventRecord
      and hipStreamWaitEvent (on a pending event, so that a wait is really enqueued), against
      ThreadPoolExecutor(max_workers=1).submit, the standard library's way to run work in
      order off the caller's thread.
  waiting: CPU time spent by a process blocked 1 s in hipEventSynchronize.
Figures are medians of many repetitions; ratios are hipipc over the baseline.

    python -m hipipc.benchmarks.bench_events [--quick] [--json PATH]
    python benchmarks/bench_events.py [--quick] [--json PATH]     (from a source checkout)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import posix_ipc

import hipipc as hip
from hipipc.bench import row as _row
from hipipc.bench import script_main, start_child, stop_child

_ns = time.perf_counter_ns
_PAUSE = 0.001  # the sender waits this long so that the receiver is surely asleep
_IPC = hip.hipEventInterprocess | hip.hipEventDisableTiming
_TIMEOUT = 30.0


# -- the receiving process --------------------------------------------------------------


def _pin(cpus: set[int]) -> None:
    """Keep every thread of this process (stream workers included: sched_setaffinity(0)
    moves only the calling thread) on ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that has just exited
            pass


def _receiver(
    conn: Connection, event_handle: bytes, sem_name: str, data_conn: Connection, cpu: int | None
) -> None:
    """Answers "event"/"pipe"/"sem"/"cpu" requests with the time it woke (or CPU seconds)."""
    allowed = os.sched_getaffinity(0)
    if cpu is not None:
        _pin({cpu})
    event = hip.hipIpcOpenEventHandle(event_handle)
    sem = posix_ipc.Semaphore(sem_name)
    try:
        while True:
            op = conn.recv()
            if op is None:
                return
            if isinstance(op, tuple):  # ("pin", cpu or None): move to one CPU, or to all
                _pin({op[1]} if op[1] is not None else allowed)
                conn.send("pinned")
            elif op == "event":
                conn.send("waiting")
                hip.hipEventSynchronize(event, timeout=_TIMEOUT)
                conn.send(_ns())
            elif op == "pipe":
                conn.send("waiting")
                data_conn.recv_bytes()
                conn.send(_ns())
            elif op == "sem":
                conn.send("waiting")
                sem.acquire(_TIMEOUT)
                conn.send(_ns())
            elif op == "cpu":
                conn.send("waiting")
                cpu0 = time.process_time()
                hip.hipEventSynchronize(event, timeout=_TIMEOUT)
                conn.send(time.process_time() - cpu0)
    finally:
        sem.close()
        hip.hipEventDestroy(event)


class _Wakeups:
    """The sending side: one IPC event, a pipe and a semaphore shared with a receiver."""

    def __init__(self, cpus: tuple[int, int] | None) -> None:
        ctx = mp.get_context("spawn")
        self.event = hip.hipEventCreateWithFlags(_IPC)
        self.stream = hip.hipStreamCreate()
        self.sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, 0o600, 0)
        self.conn, child_conn = ctx.Pipe()
        self.data, child_data = ctx.Pipe()
        self.proc = ctx.Process(
            target=_receiver,
            daemon=True,
            args=(
                child_conn,
                bytes(hip.hipIpcGetEventHandle(self.event)),
                self.sem.name,
                child_data,
                cpus[1] if cpus else None,
            ),
        )
        start_child(self.proc)
        # Gates of work enqueued on the stream: close() opens them all, so that a run cut
        # short (Ctrl-C) leaves no host function blocked on the stream until exit.
        self._gates: list[threading.Event] = []

    def _gate(self) -> threading.Event:
        self._gates = [g for g in self._gates if not g.is_set()]
        self._gates.append(threading.Event())
        return self._gates[-1]

    def _ask(self, op: object) -> None:
        self.conn.send(op)
        self._reply()

    def _reply(self) -> Any:
        if not self.conn.poll(_TIMEOUT):
            raise TimeoutError(f"the receiver gave no answer within {_TIMEOUT} s")
        return self.conn.recv()

    def event_once(self) -> int:
        """ns from the completion of the recorded work to the waiter's return."""
        gate = self._gate()
        stamp = [0]

        def work() -> None:
            gate.wait(_TIMEOUT)
            stamp[0] = _ns()  # the last thing the recorded work does

        hip.hipLaunchHostFunc(self.stream, work)
        hip.hipEventRecord(self.event, self.stream)
        self._ask("event")  # the waiter captures the record made above
        time.sleep(_PAUSE)
        gate.set()
        woke = self._reply()
        hip.hipStreamSynchronize(self.stream, timeout=_TIMEOUT)
        return int(woke) - stamp[0]

    def sem_stream_once(self) -> int:
        """ns from the same work's end to the waiter's return, when a host function enqueued
        after it releases a semaphore: event_once with a semaphore in the event's place."""
        gate = self._gate()
        stamp = [0]

        def work() -> None:
            gate.wait(_TIMEOUT)
            stamp[0] = _ns()

        hip.hipLaunchHostFunc(self.stream, work)
        hip.hipLaunchHostFunc(self.stream, self.sem.release)
        self._ask("sem")
        time.sleep(_PAUSE)
        gate.set()
        woke = self._reply()
        hip.hipStreamSynchronize(self.stream, timeout=_TIMEOUT)
        return int(woke) - stamp[0]

    def pin(self, cpus: tuple[int, int] | None, allowed: list[int]) -> None:
        """Pin the sender (its stream workers follow) and the receiver to two CPUs, or
        unpin both (None)."""
        _pin({cpus[0]} if cpus else set(allowed))
        self._ask(("pin", cpus[1] if cpus else None))

    def pipe_once(self) -> int:
        self._ask("pipe")
        time.sleep(_PAUSE)
        t0 = _ns()
        self.data.send_bytes(b"x")
        return int(self._reply()) - t0

    def sem_once(self) -> int:
        self._ask("sem")
        time.sleep(_PAUSE)
        t0 = _ns()
        self.sem.release()
        return int(self._reply()) - t0

    def cpu_while_waiting(self, seconds: float) -> float:
        gate = self._gate()
        hip.hipLaunchHostFunc(self.stream, gate.wait, _TIMEOUT)
        hip.hipEventRecord(self.event, self.stream)
        self._ask("cpu")
        time.sleep(seconds)
        gate.set()
        cpu = self._reply()
        hip.hipStreamSynchronize(self.stream, timeout=_TIMEOUT)
        return float(cpu)

    def close(self) -> None:
        for gate in self._gates:
            gate.set()
        stop_child(self.conn, self.proc)
        self.sem.unlink()
        self.sem.close()
        hip.hipStreamDestroy(self.stream)
        hip.hipEventDestroy(self.event)


# -- enqueue cost -----------------------------------------------------------------------


def _noop() -> None:
    pass


def _per_op_ns(
    enqueue: Callable[[], object],
    drain: Callable[[], object],
    batch: int,
    rounds: int,
    prepare: Callable[[], object] = lambda: None,
) -> float:
    """Median over ``rounds`` of (time for ``batch`` enqueues) / ``batch``, in ns."""
    samples = []
    for _ in range(rounds):
        prepare()
        t0 = _ns()
        for _ in range(batch):
            enqueue()
        samples.append((_ns() - t0) / batch)
        drain()
    return statistics.median(samples)


def _enqueue_costs(batch: int, rounds: int) -> dict[str, float]:
    stream = hip.hipStreamCreate()
    other = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)
    local = hip.hipEventCreateWithFlags(hip.hipEventDisableTiming)
    pending = hip.hipEventCreateWithFlags(hip.hipEventDisableTiming)
    gate = threading.Event()
    ptr = hip.hipMalloc(4096)
    host = np.zeros(4096, np.uint8)
    pool = ThreadPoolExecutor(max_workers=1)
    try:

        def sync() -> None:
            hip.hipStreamSynchronize(stream, timeout=_TIMEOUT)

        def pool_drain() -> None:
            pool.submit(_noop).result(_TIMEOUT)

        def hold_pending() -> None:
            # A wait on a complete event enqueues nothing: keep the event pending meanwhile.
            gate.clear()
            hip.hipLaunchHostFunc(other, gate.wait, _TIMEOUT)
            hip.hipEventRecord(pending, other)

        def release_and_sync() -> None:
            gate.set()
            sync()

        return {
            "hipLaunchHostFunc": _per_op_ns(
                lambda: hip.hipLaunchHostFunc(stream, _noop), sync, batch, rounds
            ),
            "hipMemcpyAsync 4 KiB": _per_op_ns(
                lambda: hip.hipMemcpyAsync(ptr, host, 4096, hip.hipMemcpyHostToDevice, stream),
                sync,
                batch,
                rounds,
            ),
            "hipEventRecord": _per_op_ns(
                lambda: hip.hipEventRecord(local, stream), sync, batch, rounds
            ),
            "hipStreamWaitEvent": _per_op_ns(
                lambda: hip.hipStreamWaitEvent(stream, pending, 0),
                release_and_sync,
                batch,
                rounds,
                prepare=hold_pending,
            ),
            "ThreadPoolExecutor.submit": _per_op_ns(
                lambda: pool.submit(_noop), pool_drain, batch, rounds
            ),
        }
    finally:
        pool.shutdown()
        gate.set()
        for s in (stream, other):
            hip.hipStreamSynchronize(s, timeout=_TIMEOUT)
            hip.hipStreamDestroy(s)
        hip.hipEventDestroy(local)
        hip.hipEventDestroy(pending)
        hip.hipFree(ptr)


# -- the report -------------------------------------------------------------------------


_METHODS = ("event", "sem_stream", "sem", "pipe")
_NAMES = {
    "event": "hipEventSynchronize (IPC event)",
    "sem_stream": "posix_ipc.Semaphore released by the stream",
    "sem": "posix_ipc.Semaphore released by the main thread",
    "pipe": "multiprocessing.Pipe one-way",
}


def _rounds(wake: _Wakeups, rounds: int, per_round: int) -> dict[str, Any]:
    """Alternating rounds of every method: {"med": {method: us}, "ratio": {method: event
    over it}, "samples": {method: [ns]}}; medians of the rounds' medians and ratios."""
    once = {
        "event": wake.event_once,
        "sem_stream": wake.sem_stream_once,
        "sem": wake.sem_once,
        "pipe": wake.pipe_once,
    }
    medians: dict[str, list[float]] = {m: [] for m in _METHODS}
    samples: dict[str, list[int]] = {m: [] for m in _METHODS}
    for r in range(rounds):
        for method in _METHODS if r % 2 == 0 else reversed(_METHODS):
            block = [once[method]() for _ in range(per_round)]
            samples[method] += block
            medians[method].append(statistics.median(block) / 1e3)
    return {
        "med": {m: statistics.median(v) for m, v in medians.items()},
        "ratio": {
            m: statistics.median([e / b for e, b in zip(medians["event"], medians[m], strict=True)])
            for m in _METHODS
        },
        "samples": samples,
    }


def run(quick: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every case; returns ``{"name", "rows", "series"}`` (see hipipc/bench.py)."""
    say = progress or (lambda _msg: None)
    rounds, per_round = (5, 40) if quick else (9, 150)
    rows: list[dict[str, Any]] = []
    series: dict[str, Any] = {}
    allowed = sorted(os.sched_getaffinity(0))
    cpus = (allowed[0], allowed[1]) if len(allowed) >= 2 else None
    wake = _Wakeups(None)
    try:
        results = {}
        for label, pinning in (("unpinned", None), ("pinned", cpus)):
            if label == "pinned" and pinning is None:
                continue  # one CPU: nothing to pin to
            wake.pin(pinning, allowed)
            say(f"wake-up latency, {label}: {rounds} rounds of {per_round} per method")
            res = results[label] = _rounds(wake, rounds, per_round)
            med, ratio = res["med"], res["ratio"]
            event = f"wake-up: {_NAMES['event']}, {label}"
            rows.append(
                _row(
                    event,
                    med["event"],
                    _NAMES["sem_stream"],
                    med["sem_stream"],
                    "<= 1.2x",
                    met=ratio["sem_stream"] <= 1.2,
                    ratio=ratio["sem_stream"],
                )
            )
            rows.append(_row(event, med["event"], _NAMES["sem"], med["sem"], ratio=ratio["sem"]))
            pinned = label == "pinned"
            rows.append(
                _row(
                    event,
                    med["event"],
                    _NAMES["pipe"],
                    med["pipe"],
                    "<= 1x" if pinned else None,
                    met=ratio["pipe"] <= 1.0 if pinned else None,
                    ratio=ratio["pipe"],
                )
            )
        res = results.get("pinned") or results["unpinned"]
        pcts = [50, 90, 99]
        series["wakeup_latency"] = {
            "x_label": "percentile",
            "y_label": "wake-up latency (us)",
            "x": pcts,
            "lines": {
                _NAMES[m]: [float(np.percentile(res["samples"][m], p)) / 1e3 for p in pcts]
                for m in _METHODS
            },
        }

        say("CPU time of a waiter blocked for 1 s")
        cpu = wake.cpu_while_waiting(1.0)
        rows.append(
            _row(
                "CPU spent waiting 1 s in hipEventSynchronize (one sample)",
                cpu * 1e6,
                target="well under 0.3 s",
                met=cpu < 0.3,
            )
        )
    finally:
        wake.close()
        _pin(set(allowed))

    say("enqueue cost per operation")
    costs = _enqueue_costs(batch=200 if quick else 1000, rounds=10 if quick else 50)
    base = costs.pop("ThreadPoolExecutor.submit") / 1e3
    for op, ns in costs.items():
        rows.append(_row(f"enqueue: {op}", ns / 1e3, "ThreadPoolExecutor.submit", base))
    return {"name": "events", "rows": rows, "series": series}


def main(argv: list[str] | None = None) -> int:
    """The script's command line (``--quick``, ``--json PATH``); returns the exit code."""
    return script_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
