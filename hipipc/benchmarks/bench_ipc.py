"""IPC memory benchmark: hipipc against baselines measured in the same run.

Cases (issue 2's targets in brackets):
  (a) open+close of a 1 MiB handle in another process, vs the floor (os.open + fstat + mmap +
      close of a tmpfs file) [<= 2x] and vs multiprocessing.shared_memory.SharedMemory(name)
      + close [<= 1x];
  (b) open+close of a 1 GiB handle vs a 4 KiB one [<= 1.3x], beside the floor's own ratio
      (the kernel's cost of mapping and unmapping 1 GiB, which no library can avoid);
  (c) repeated hipIpcGetMemHandle of an exported allocation [<= 3 us];
  (d) handing a 256 MiB array to another process (export + 64 bytes over a pipe + open +
      asarray) vs pickling it through a multiprocessing.Pipe [>= 1000x faster];
  (e) 64 MiB hipMemcpy device-to-device and host-to-device vs numpy.copyto [>= 0.9x];
  (f) a memory pool's hipMallocFromPoolAsync + hipFreeAsync of 1 MiB vs hipMalloc + hipFree
      (reported, issue 13).
  (d, fresh) the same to a freshly spawned worker (started, hipipc and numpy imported,
      before the clock; the clock runs from the export to the reply) vs pickling through the
      same Pipe to one, median of 7 alternating rounds, 3 with --quick [issue 15: >= 5000x
      faster]; the note gives the worker's steps (its first open and asarray);
  fd transport: open+close of 1 MiB exported by a HIPIPC_TRANSPORT=fd process vs the store
      transport's [<= 1x] and the floor [<= 1.5x] (issue 13; skipped, with a note, while that
      transport is unavailable); torch's file_descriptor strategy (multiprocessing DupFd, then
      fstat + mmap in the receiver) as a reported baseline against the floor.
  (cold) the first hipIpcOpenMemHandle of a 1 MiB handle in a fresh process [<= 50 us] and
      the first asarray of it [<= 30 us] (issue 15), beside the first os.open + fstat + mmap of
      a fresh file and the first numpy.frombuffer of that mmap in a fresh process; the median
      over 30 fresh processes (10 with --quick), their interpreter start and imports excluded.
Every figure is a median of many repetitions; ratios compare medians taken in this run and
read in the target's direction: time over the baseline's time for (a) and (b), the baseline's
time over hipipc's (speed-up, throughput ratio) for (d) and (e).

    python -m hipipc.benchmarks.bench_ipc [--quick] [--json PATH]
    python benchmarks/bench_ipc.py [--quick] [--json PATH]     (from a source checkout)
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

import hipipc as hip
from hipipc.bench import child_reply, script_main, start_child, stop_child
from hipipc.bench import row as _row

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
_ns = time.perf_counter_ns


# -- the child process: times opens on request ------------------------------------------


def _time_hip_open(handle: bytes, reps: int) -> list[int]:
    out = []
    for _ in range(reps):
        t0 = _ns()
        ptr = hip.hipIpcOpenMemHandle(handle)
        hip.hipIpcCloseMemHandle(ptr)
        out.append(_ns() - t0)
    return out


def _time_floor(path: str, reps: int) -> list[int]:
    out = []
    for _ in range(reps):
        t0 = _ns()
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size)
        os.close(fd)
        mm.close()
        out.append(_ns() - t0)
    return out


def _time_shared_memory(name: str, reps: int) -> list[int]:
    out = []
    for _ in range(reps):
        t0 = _ns()
        shm = shared_memory.SharedMemory(name)
        shm.close()
        out.append(_ns() - t0)
    return out


def _child(conn: Connection) -> None:
    ops: dict[str, Callable[..., list[int]]] = {
        "hip_open": _time_hip_open,
        "floor": _time_floor,
        "shm": _time_shared_memory,
    }
    while True:
        msg = conn.recv()
        if msg is None:
            return
        op, args = msg
        try:
            if op == "handoff_hip":
                handle = conn.recv_bytes()
                ptr = hip.hipIpcOpenMemHandle(handle)
                arr = hip.asarray(ptr, args // 8, np.float64)
                done = _ns()
                ok = arr[-1] == args // 8 - 1
                del arr
                hip.hipIpcCloseMemHandle(ptr)
                conn.send((done, bool(ok)))
            elif op == "handoff_pickle":
                arr = conn.recv()
                done = _ns()
                conn.send((done, bool(arr[-1] == arr.size - 1)))
            else:
                conn.send(ops[op](*args))
        except Exception as exc:  # the parent re-raises it
            conn.send(exc)


class _Peer:
    """A spawned interpreter that runs timing loops on request (every wait bounded)."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child,), daemon=True)
        start_child(self.proc)

    def call(self, op: str, *args: Any, timeout: float = 120.0) -> Any:
        self.conn.send((op, args))
        return self.reply(timeout)

    def reply(self, timeout: float = 120.0) -> Any:
        return child_reply(self.conn, timeout, "benchmark child")

    def close(self) -> None:
        stop_child(self.conn, self.proc)


def _median_us(samples_ns: list[int]) -> float:
    return statistics.median(samples_ns) / 1e3


# -- cases ------------------------------------------------------------------------------


def _open_latencies(
    peer: _Peer, sizes: list[int], reps: int, tmpdir: str
) -> dict[int, tuple[float, float, float]]:
    """(hipipc, floor, SharedMemory) median open+close in microseconds, per size."""
    out = {}
    for size in sizes:
        ptr = hip.hipMalloc(size)
        path = os.path.join(tmpdir, f"floor-{size}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        shm = shared_memory.SharedMemory(create=True, size=size)
        try:
            os.posix_fallocate(fd, 0, size)
            handle = bytes(hip.hipIpcGetMemHandle(ptr))
            hips, floors, shms = [], [], []
            # Interleave rounds so drift on a shared machine hits every method alike.
            for _ in range(5):
                hips += peer.call("hip_open", handle, reps // 5)
                floors += peer.call("floor", path, reps // 5)
                shms += peer.call("shm", shm.name, reps // 5)
            out[size] = (_median_us(hips), _median_us(floors), _median_us(shms))
        finally:
            os.close(fd)
            os.unlink(path)
            shm.close()
            shm.unlink()
            hip.hipFree(ptr)
    return out


def _export_cost(reps: int) -> float:
    ptr = hip.hipMalloc(MiB)
    try:
        hip.hipIpcGetMemHandle(ptr)
        samples = []
        for _ in range(reps):
            t0 = _ns()
            hip.hipIpcGetMemHandle(ptr)
            samples.append(_ns() - t0)
        return _median_us(samples)
    finally:
        hip.hipFree(ptr)


def _handoff(peer: _Peer, nbytes: int, hip_reps: int, pickle_reps: int) -> tuple[float, float]:
    """Median microseconds to hand ``nbytes`` to the peer: (hipipc, pickle over a Pipe)."""
    n = nbytes // 8
    hips = []
    for _ in range(hip_reps):
        ptr = hip.hipMalloc(nbytes)
        try:
            hip.asarray(ptr, n, np.float64)[:] = np.arange(n, dtype=np.float64)
            peer.conn.send(("handoff_hip", nbytes))
            t0 = _ns()
            handle = hip.hipIpcGetMemHandle(ptr)
            peer.conn.send_bytes(bytes(handle))
            done, ok = peer.reply()
            if not ok:
                raise RuntimeError("the peer saw wrong data through the handle")
            hips.append(done - t0)
        finally:
            hip.hipFree(ptr)
    arr = np.arange(n, dtype=np.float64)
    pickles = []
    for _ in range(pickle_reps):
        peer.conn.send(("handoff_pickle", None))
        t0 = _ns()
        peer.conn.send(arr)
        done, ok = peer.reply()
        if not ok:
            raise RuntimeError("the peer saw wrong data through pickle")
        pickles.append(done - t0)
    return _median_us(hips), _median_us(pickles)


# A fresh interpreter's first open and first asarray (import excluded), printed in ns.
_COLD_HIP = """
import sys, time
import numpy as np
import hipipc as hip
ns = time.perf_counter_ns
raw = bytes.fromhex(sys.argv[1])
t0 = ns()
ptr = hip.hipIpcOpenMemHandle(raw)
t1 = ns()
arr = hip.asarray(ptr, 1 << 20, np.uint8)
t2 = ns()
ok = int(arr[0]) == 0x5A and int(arr[-1]) == 0x5A
del arr
hip.hipIpcCloseMemHandle(ptr)
print(t1 - t0, t2 - t1, int(ok))
"""
# The floor in the same kind of process (hipipc imported too): the first os.open + fstat +
# mmap of a fresh file, then the first numpy view of that mapping.
_COLD_FLOOR = """
import mmap, os, sys, time
import numpy as np
import hipipc
ns = time.perf_counter_ns
t0 = ns()
fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
mm = mmap.mmap(fd, os.fstat(fd).st_size)
os.close(fd)
t1 = ns()
arr = np.frombuffer(mm, np.uint8)
t2 = ns()
ok = int(arr[0]) == 0x5A
del arr
mm.close()
print(t1 - t0, t2 - t1, int(ok))
"""


def _fresh_process(code: str, arg: str) -> tuple[int, int]:
    """Run ``code`` in a new interpreter (bounded); its two timings in ns."""
    top = os.path.dirname(os.path.dirname(os.path.abspath(hip.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([top, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=120, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cold-path child failed: {proc.stderr.strip()[-2000:]}")
    first, second, ok = (int(x) for x in proc.stdout.split())
    if not ok:
        raise RuntimeError("the cold-path child saw wrong data")
    return first, second


def _cold_path(processes: int, tmpdir: str) -> tuple[float, float, float, float]:
    """Median microseconds over ``processes`` fresh interpreters of each kind, alternated:
    (first open, first asarray, floor's first open+fstat+mmap, floor's first frombuffer)."""
    ptr = hip.hipMalloc(MiB)
    try:
        hip.hipMemset(ptr, 0x5A, MiB)
        raw = bytes(hip.hipIpcGetMemHandle(ptr)).hex()
        opens, arrays, floor_maps, floor_views = [], [], [], []
        for i in range(processes):
            path = os.path.join(tmpdir, f"cold-{i}")  # a fresh file for each floor process
            with open(path, "wb") as f:
                f.write(b"\x5a" * MiB)
            try:
                first, second = _fresh_process(_COLD_FLOOR, path)
            finally:
                os.unlink(path)
            floor_maps.append(first)
            floor_views.append(second)
            first, second = _fresh_process(_COLD_HIP, raw)
            opens.append(first)
            arrays.append(second)
        return (
            _median_us(opens),
            _median_us(arrays),
            _median_us(floor_maps),
            _median_us(floor_views),
        )
    finally:
        hip.hipFree(ptr)


def _copy_bandwidth(size: int, reps: int) -> tuple[float, float, float]:
    """Median microseconds per copy of ``size`` bytes: (D2D, H2D, numpy.copyto)."""
    a, b = hip.hipMalloc(size), hip.hipMalloc(size)
    host_src = np.ones(size, np.uint8)
    host_dst = np.empty(size, np.uint8)
    try:
        hip.hipMemset(a, 1, size)
        hip.hipMemset(b, 2, size)
        d2d, h2d, npc = [], [], []
        for _ in range(reps):
            t0 = _ns()
            hip.hipMemcpy(b, a, size, hip.hipMemcpyDeviceToDevice)
            t1 = _ns()
            hip.hipMemcpy(a, host_src, size, hip.hipMemcpyHostToDevice)
            t2 = _ns()
            np.copyto(host_dst, host_src)
            t3 = _ns()
            d2d.append(t1 - t0)
            h2d.append(t2 - t1)
            npc.append(t3 - t2)
        return _median_us(d2d), _median_us(h2d), _median_us(npc)
    finally:
        hip.hipFree(a)
        hip.hipFree(b)


def _pool_alloc_cost(nbytes: int, reps: int) -> tuple[float, float, float]:
    """Median microseconds per allocate+free pair of ``nbytes``: a memory pool's
    hipMallocFromPoolAsync + hipFreeAsync with the default release threshold (0: freed
    memory goes back to the kernel), the same with the threshold at UINT64_MAX (freed memory
    stays committed for reuse, the usual tuning), and hipMalloc + hipFree.  Batches of 50
    pairs with one synchronize each (the pool's frees take effect in stream order)."""
    props = hip.hipMemPoolProps(
        allocType=hip.hipMemAllocationTypePinned,
        handleTypes=hip.hipMemHandleTypePosixFileDescriptor,
        location=hip.hipMemLocation(hip.hipMemLocationTypeDevice, 0),
    )
    pools = [hip.hipMemPoolCreate(props), hip.hipMemPoolCreate(props)]
    hip.hipMemPoolSetAttribute(pools[1], hip.hipMemPoolAttrReleaseThreshold, 2**64 - 1)
    stream = hip.hipStreamCreate()
    batch = 50
    samples: list[list[int]] = [[], [], []]
    try:
        for _ in range(max(1, reps // batch)):  # interleaved: drift hits all alike
            for pool, out in zip(pools, samples, strict=False):
                t0 = _ns()
                for _ in range(batch):
                    hip.hipFreeAsync(hip.hipMallocFromPoolAsync(nbytes, pool, stream), stream)
                hip.hipStreamSynchronize(stream)
                out.append((_ns() - t0) // batch)
            t0 = _ns()
            for _ in range(batch):
                hip.hipFree(hip.hipMalloc(nbytes))
            samples[2].append((_ns() - t0) // batch)
        return _median_us(samples[0]), _median_us(samples[1]), _median_us(samples[2])
    finally:
        hip.hipStreamDestroy(stream)
        for pool in pools:
            hip.hipMemPoolDestroy(pool)


def run(quick: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every case; returns ``{"name", "rows", "series"}`` (see benchmarks/README)."""
    from . import ipc_more as _more  # it imports this module: imported here, not on top

    say = progress or (lambda _msg: None)
    reps = 500 if quick else 5000
    rows = []
    series: dict[str, Any] = {}
    peer = _Peer()
    tmpdir = tempfile.mkdtemp(prefix="bench-floor-", dir="/dev/shm")
    try:
        say("open latency against size")
        sizes = (
            [4 * KiB, MiB, 64 * MiB, GiB]
            if quick
            else [4 * KiB, 64 * KiB, MiB, 16 * MiB, 256 * MiB, GiB]
        )
        lat = _open_latencies(peer, sizes, reps, tmpdir)
        series["open_latency"] = {
            "x_label": "allocation size (bytes)",
            "y_label": "open+close latency (us)",
            "x": sizes,
            "lines": {
                "hipipc": [lat[s][0] for s in sizes],
                "os.open+fstat+mmap (floor)": [lat[s][1] for s in sizes],
                "SharedMemory(name)": [lat[s][2] for s in sizes],
            },
        }
        hip_1m, floor_1m, shm_1m = lat[MiB]
        rows.append(
            _row(
                "(a) open+close 1 MiB in another process",
                hip_1m,
                "os.open+fstat+mmap+close",
                floor_1m,
                "<= 2x",
                met=hip_1m <= 2 * floor_1m,
            )
        )
        rows.append(
            _row(
                "(a) open+close 1 MiB in another process",
                hip_1m,
                "SharedMemory(name)+close",
                shm_1m,
                "<= 1x",
                met=hip_1m <= shm_1m,
            )
        )
        ratio_b = lat[GiB][0] / lat[4 * KiB][0]
        rows.append(
            _row(
                "(b) open+close 1 GiB",
                lat[GiB][0],
                "same for 4 KiB",
                lat[4 * KiB][0],
                "<= 1.3x",
                met=ratio_b <= 1.3,
            )
        )
        # Issue 15's tighter target for the same figure.
        rows.append(
            _row(
                "(a) open+close 1 MiB in another process",
                hip_1m,
                "os.open+fstat+mmap+close",
                floor_1m,
                "<= 1.4x",
                met=hip_1m <= 1.4 * floor_1m,
            )
        )
        # The kernel's own share of (b): mapping and unmapping 1 GiB costs the floor more too.
        rows.append(
            _row(
                "(b) reference: the floor at 1 GiB", lat[GiB][1], "floor at 4 KiB", lat[4 * KiB][1]
            )
        )

        say("repeated hipIpcGetMemHandle")
        export_us = _export_cost(reps * 4)
        rows.append(
            _row(
                "(c) hipIpcGetMemHandle, repeated",
                export_us,
                target="<= 3 us",
                met=export_us <= 3.0,
            )
        )

        say("handing a 256 MiB array to another process")
        hand_hip, hand_pickle = _handoff(peer, 256 * MiB, 5 if quick else 20, 2 if quick else 5)
        speedup = hand_pickle / hand_hip
        rows.append(
            _row(
                "(d) hand 256 MiB to another process",
                hand_hip,
                "pickle through multiprocessing.Pipe",
                hand_pickle,
                ">= 1000x faster",
                ratio=speedup,
                met=speedup >= 1000,
            )
        )
        say("handing 256 MiB to freshly spawned workers")
        rows.append(_more.handoff_fresh_row(256 * MiB, 3 if quick else 7))

        say("first open and asarray in fresh processes")
        cold_open, cold_array, cold_floor, cold_view = _cold_path(10 if quick else 30, tmpdir)
        rows.append(
            _row(
                "(cold) first hipIpcOpenMemHandle in a fresh process",
                cold_open,
                "first os.open+fstat+mmap there",
                cold_floor,
                "<= 50 us",
                met=cold_open <= 50.0,
            )
        )
        rows.append(
            _row(
                "(cold) first asarray of it",
                cold_array,
                "first numpy.frombuffer of the mmap",
                cold_view,
                "<= 30 us",
                met=cold_array <= 30.0,
            )
        )

        say("copy bandwidth against size")
        csizes = (
            [64 * KiB, MiB, 64 * MiB]
            if quick
            else [4 * KiB, 64 * KiB, MiB, 16 * MiB, 64 * MiB, 256 * MiB]
        )
        bw = {
            s: _copy_bandwidth(s, 10 if s >= 64 * MiB else (30 if quick else 200)) for s in csizes
        }
        series["copy_bandwidth"] = {
            "x_label": "copy size (bytes)",
            "y_label": "bandwidth (GB/s)",
            "x": csizes,
            "lines": {
                name: [s / (bw[s][i] * 1e3) for s in csizes]
                for i, name in enumerate(["hipMemcpy D2D", "hipMemcpy H2D", "numpy.copyto"])
            },
        }
        d2d, h2d, npc = bw[64 * MiB]
        for case, t in (
            ("(e) hipMemcpy 64 MiB device-to-device", d2d),
            ("(e) hipMemcpy 64 MiB host-to-device", h2d),
        ):
            rows.append(
                _row(
                    case,
                    t,
                    "numpy.copyto",
                    npc,
                    ">= 0.9x throughput",
                    ratio=npc / t,
                    met=npc / t >= 0.9,
                )
            )
        say("memory-pool allocation against hipMalloc")
        pool_us, cached_us, malloc_us = _pool_alloc_cost(MiB, reps // 4)
        for case, t in (
            ("(f) hipMallocFromPoolAsync+hipFreeAsync 1 MiB", pool_us),
            ("(f) the same, release threshold UINT64_MAX", cached_us),
        ):
            rows.append(_row(case, t, "hipMalloc+hipFree", malloc_us))

        say("fd transport and torch's file_descriptor strategy")
        rows += _more.fd_rows(reps, tmpdir)
    finally:
        peer.close()
        os.rmdir(tmpdir)
    return {"name": "ipc", "rows": rows, "series": series}


def main(argv: list[str] | None = None) -> int:
    """The script's command line (``--quick``, ``--json PATH``); returns the exit code."""
    return script_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
