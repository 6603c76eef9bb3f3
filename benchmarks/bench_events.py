"""IPC event benchmark: wake-up latency across processes and the cost of enqueueing.

Cases (issue 3's target in brackets):
  wake-up: from the completion of an IPC event's recorded work in one process to the return
      of hipEventSynchronize in another [<= 1x the pipe's one-way latency], against, measured
      the same way in the same run, the one-way latency of a multiprocessing.Pipe message
      and of a posix_ipc.Semaphore release.  In every method the receiver is already asleep
      when the sender acts (the sender pauses 1 ms first), and both stamps come from
      time.perf_counter_ns (CLOCK_MONOTONIC, one clock for all processes).
  enqueue: the per-operation cost of hipLaunchHostFunc, hipMemcpyAsync (4 KiB), hipEventRecord
      and hipStreamWaitEvent on a stream, against ThreadPoolExecutor(max_workers=1).submit,
      the standard library's way to run work in order off the caller's thread.
  waiting: CPU time spent by a process blocked 1 s in hipEventSynchronize.
Figures are medians of many repetitions; ratios are hipipc over the baseline.

    python benchmarks/bench_events.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import posix_ipc

import hipipc as hip

_ns = time.perf_counter_ns
_PAUSE = 0.001  # the sender waits this long so that the receiver is surely asleep
_IPC = hip.hipEventInterprocess | hip.hipEventDisableTiming
_TIMEOUT = 30.0


# -- the receiving process --------------------------------------------------------------


def _receiver(conn, event_handle: bytes, sem_name: str, data_conn) -> None:
    """Answers "event"/"pipe"/"sem"/"cpu" requests with the time it woke (or CPU seconds)."""
    event = hip.hipIpcOpenEventHandle(event_handle)
    sem = posix_ipc.Semaphore(sem_name)
    try:
        while True:
            op = conn.recv()
            if op is None:
                return
            if op == "event":
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

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.event = hip.hipEventCreateWithFlags(_IPC)
        self.stream = hip.hipStreamCreate()
        self.sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, 0o600, 0)
        self.conn, child_conn = ctx.Pipe()
        self.data, child_data = ctx.Pipe()
        self.proc = ctx.Process(target=_receiver, daemon=True, args=(
            child_conn, bytes(hip.hipIpcGetEventHandle(self.event)), self.sem.name,
            child_data))
        self.proc.start()

    def _ask(self, op: str) -> None:
        self.conn.send(op)
        self._reply()

    def _reply(self):
        if not self.conn.poll(_TIMEOUT):
            raise TimeoutError(f"the receiver gave no answer within {_TIMEOUT} s")
        return self.conn.recv()

    def event_once(self) -> int:
        """ns from the completion of the recorded work to the waiter's return."""
        gate = threading.Event()
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
        return woke - stamp[0]

    def pipe_once(self) -> int:
        self._ask("pipe")
        time.sleep(_PAUSE)
        t0 = _ns()
        self.data.send_bytes(b"x")
        return self._reply() - t0

    def sem_once(self) -> int:
        self._ask("sem")
        time.sleep(_PAUSE)
        t0 = _ns()
        self.sem.release()
        return self._reply() - t0

    def cpu_while_waiting(self, seconds: float) -> float:
        gate = threading.Event()
        hip.hipLaunchHostFunc(self.stream, gate.wait, _TIMEOUT)
        hip.hipEventRecord(self.event, self.stream)
        self._ask("cpu")
        time.sleep(seconds)
        gate.set()
        cpu = self._reply()
        hip.hipStreamSynchronize(self.stream, timeout=_TIMEOUT)
        return cpu

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.sem.unlink()
        self.sem.close()
        hip.hipStreamDestroy(self.stream)
        hip.hipEventDestroy(self.event)


# -- enqueue cost -----------------------------------------------------------------------


def _noop() -> None:
    pass


def _per_op_ns(enqueue: Callable[[], object], drain: Callable[[], object], batch: int,
               rounds: int) -> float:
    """Median over ``rounds`` of (time for ``batch`` enqueues) / ``batch``, in ns."""
    samples = []
    for _ in range(rounds):
        t0 = _ns()
        for _ in range(batch):
            enqueue()
        samples.append((_ns() - t0) / batch)
        drain()
    return statistics.median(samples)


def _enqueue_costs(batch: int, rounds: int) -> dict[str, float]:
    stream = hip.hipStreamCreate()
    local = hip.hipEventCreateWithFlags(hip.hipEventDisableTiming)
    ptr = hip.hipMalloc(4096)
    host = np.zeros(4096, np.uint8)
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        def sync() -> None:
            hip.hipStreamSynchronize(stream, timeout=_TIMEOUT)

        def pool_drain() -> None:
            pool.submit(_noop).result(_TIMEOUT)

        return {
            "hipLaunchHostFunc": _per_op_ns(lambda: hip.hipLaunchHostFunc(stream, _noop),
                                            sync, batch, rounds),
            "hipMemcpyAsync 4 KiB": _per_op_ns(
                lambda: hip.hipMemcpyAsync(ptr, host, 4096, hip.hipMemcpyHostToDevice, stream),
                sync, batch, rounds),
            "hipEventRecord": _per_op_ns(lambda: hip.hipEventRecord(local, stream), sync,
                                         batch, rounds),
            "hipStreamWaitEvent": _per_op_ns(lambda: hip.hipStreamWaitEvent(stream, local, 0),
                                             sync, batch, rounds),
            "ThreadPoolExecutor.submit": _per_op_ns(lambda: pool.submit(_noop), pool_drain,
                                                    batch, rounds),
        }
    finally:
        pool.shutdown()
        hip.hipStreamSynchronize(stream, timeout=_TIMEOUT)
        hip.hipStreamDestroy(stream)
        hip.hipEventDestroy(local)
        hip.hipFree(ptr)


# -- the report -------------------------------------------------------------------------


def _row(case, median_us, baseline=None, baseline_us=None, target=None, met=None):
    ratio = median_us / baseline_us if baseline_us else None
    return {"case": case, "median_us": median_us, "baseline": baseline,
            "baseline_us": baseline_us, "ratio": ratio, "target": target, "met": met}


def run(quick: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Run every case; returns ``{"name", "rows", "series"}`` (see hipipc/bench.py)."""
    say = progress or (lambda _msg: None)
    trials = 300 if quick else 1500
    rows: list[dict] = []
    series: dict = {}
    wake = _Wakeups()
    try:
        say(f"wake-up latency, {trials} trials per method")
        samples: dict[str, list[int]] = {"event": [], "pipe": [], "sem": []}
        for _ in range(trials):  # interleaved, so drift on a shared machine hits all alike
            samples["event"].append(wake.event_once())
            samples["pipe"].append(wake.pipe_once())
            samples["sem"].append(wake.sem_once())
        med = {k: statistics.median(v) / 1e3 for k, v in samples.items()}
        rows.append(_row("wake-up: hipEventSynchronize (IPC event)", med["event"],
                         "multiprocessing.Pipe one-way", med["pipe"], "<= 1x",
                         met=med["event"] <= med["pipe"]))
        rows.append(_row("wake-up: hipEventSynchronize (IPC event)", med["event"],
                         "posix_ipc.Semaphore release", med["sem"]))
        pcts = [50, 90, 99]
        series["wakeup_latency"] = {
            "x_label": "percentile", "y_label": "wake-up latency (us)", "x": pcts,
            "lines": {name: [float(np.percentile(samples[key], p)) / 1e3 for p in pcts]
                      for key, name in (("event", "hipEventSynchronize (IPC event)"),
                                        ("pipe", "multiprocessing.Pipe"),
                                        ("sem", "posix_ipc.Semaphore"))},
        }

        say("CPU time of a waiter blocked for 1 s")
        cpu = wake.cpu_while_waiting(1.0)
        rows.append(_row("CPU spent waiting 1 s in hipEventSynchronize", cpu * 1e6,
                         target="well under 0.3 s", met=cpu < 0.3))
    finally:
        wake.close()

    say("enqueue cost per operation")
    costs = _enqueue_costs(batch=200 if quick else 1000, rounds=10 if quick else 50)
    base = costs.pop("ThreadPoolExecutor.submit") / 1e3
    for op, ns in costs.items():
        rows.append(_row(f"enqueue: {op}", ns / 1e3, "ThreadPoolExecutor.submit", base))
    return {"name": "events", "rows": rows, "series": series}


def format_table(result: dict) -> str:
    head = f"{'case':44} {'median':>11}  {'baseline (median)':40} {'ratio':>7}  {'target':18} met"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        base = f"{r['baseline']} ({r['baseline_us']:.1f} us)" if r["baseline"] else ""
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        lines.append(f"{r['case']:44} {r['median_us']:>8.1f} us  {base:40} {ratio:>7}  "
                     f"{r['target'] or '':18} {met}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)
    result = run(args.quick, progress=lambda m: print(f"... {m}", file=sys.stderr))
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
