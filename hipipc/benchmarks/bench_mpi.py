"""MPI benchmark: two ranks of one node exchange data through hipipc, a shared window, messages.

Cases (issue 14's targets in brackets), all between the two ranks of ``mpiexec -n 2``:
  exchange, 4 KiB / 1 MiB / 64 MiB: each step a rank stamps its outgoing buffer, the ranks
      synchronize, and each copies the other's buffer into a private array (double-buffered:
      step i uses slot i % 2, so one barrier per step orders both directions).  Through
      hipipc buffers (NodeComm.allocate_shared) [<= 1.1x the window at 4 KiB and 1 MiB; <= 0.5x
      Sendrecv at 1 MiB], against the same pattern through an MPI-3 shared window
      (Win.Allocate_shared + Shared_query, Lock_all and Sync around the barrier, as the MPI
      standard asks) and against comm.Sendrecv of numpy arrays (same stamps, same private
      result).
  in-place: each step a rank stamps one word of its hipipc buffer, a barrier, then it reads the
      other's word in place [<= 1.15x a bare barrier].
  event overhead: the in-place step with the write ordered by an IPC event (hipEventRecord
      here, hipEventSynchronize on the peer's opened event) on top of the barrier, against the
      in-place step.
Every step checks the stamp it read.  Figures are medians over rounds in which the methods
take turns (drift on a shared machine hits all alike); ratios are hipipc over the baseline.

    python -m hipipc.benchmarks.bench_mpi [--quick] [--json PATH]     # launches mpiexec -n 2
    mpiexec -n 2 python -m hipipc.benchmarks.bench_mpi [--quick] [--json PATH]
    python benchmarks/bench_mpi.py ...                                # the same, from a checkout
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

import hipipc as hip
from hipipc.bench import format_rows, human_size, script_main
from hipipc.bench import row as _row

if TYPE_CHECKING:  # both need mpi4py, which this module imports only where it runs MPI
    from mpi4py import MPI

    from hipipc.mpi import NodeComm

KiB, MiB = 1 << 10, 1 << 20
SIZES = (4 * KiB, MiB, 64 * MiB)
_TIMEOUT = 30.0
# Environment variables MPI launchers give their ranks (MPICH/Hydra, Open MPI, PMIx).
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
_IPC = hip.hipEventInterprocess | hip.hipEventDisableTiming
_ns = time.perf_counter_ns


def _under_mpiexec() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


# -- the two ranks ----------------------------------------------------------------------


def _timed(
    steps: dict[str, Callable[[int], None]], block: int, rounds: int, node: MPI.Comm
) -> dict[str, float]:
    """Median microseconds per step of each method; methods take turns in every round, in
    an order that rotates from round to round (no method always runs first)."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    counter = 0
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            step = steps[name]
            node.Barrier()
            t0 = _ns()
            for _ in range(block):
                counter += 1
                step(counter)
            samples[name].append((_ns() - t0) / block / 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def _check(got: int, want: int, what: str) -> None:
    if got != want:
        raise RuntimeError(f"{what}: read stamp {got}, expected {want} (ordering is broken)")


def _exchange_steps(
    nc: NodeComm, size: int
) -> tuple[dict[str, Callable[[int], None]], Callable[[], None]]:
    """The three exchange methods for ``size`` bytes, and a function that frees them."""
    from mpi4py import MPI

    node = nc.node
    peer = nc.node_ranks[1 - node.Get_rank()]
    local_peer = 1 - node.Get_rank()
    words = size // 8
    dst = np.ones(words, dtype=np.uint64)

    mine, peers = nc.allocate_shared(2 * size, peers=[peer])
    h_mine = mine.asarray(np.uint64, (2, words))
    h_theirs = peers[peer].asarray(np.uint64, (2, words))
    h_mine[:] = 1  # touch every page before timing

    # cast: Split_type of an intracommunicator is one (mpi4py's stubs say Comm).
    win = MPI.Win.Allocate_shared(2 * size, 1, comm=cast(MPI.Intracomm, node))
    # ignores: MPI.buffer has the buffer protocol; numpy's stubs for Python < 3.12 list only
    # some buffer types.
    w_mine = np.frombuffer(  # type: ignore[call-overload]
        win.Shared_query(node.Get_rank())[0], np.uint64
    ).reshape(2, words)
    w_theirs = np.frombuffer(  # type: ignore[call-overload]
        win.Shared_query(local_peer)[0], np.uint64
    ).reshape(2, words)
    w_mine[:] = 1
    win.Lock_all(MPI.MODE_NOCHECK)

    send = np.ones(words, dtype=np.uint64)
    recv = np.ones(words, dtype=np.uint64)

    def hipipc_step(i: int) -> None:
        h_mine[i & 1, 0] = i
        node.Barrier()
        np.copyto(dst, h_theirs[i & 1])
        _check(int(dst[0]), i, "hipipc exchange")

    def window_step(i: int) -> None:
        w_mine[i & 1, 0] = i
        win.Sync()
        node.Barrier()
        win.Sync()
        np.copyto(dst, w_theirs[i & 1])
        _check(int(dst[0]), i, "window exchange")

    def sendrecv_step(i: int) -> None:
        send[0] = i
        node.Sendrecv(send, dest=local_peer, recvbuf=recv, source=local_peer)
        _check(int(recv[0]), i, "Sendrecv")

    def free() -> None:
        win.Unlock_all()
        win.Free()

    return {"hipipc": hipipc_step, "window": window_step, "sendrecv": sendrecv_step}, free


def _sync_steps(nc: NodeComm) -> tuple[dict[str, Callable[[int], None]], hip.Event]:
    """The in-place, barrier and event steps, and this rank's IPC event (destroy it after
    the NodeComm is closed: the peer's import of it is gone by then)."""
    node = nc.node
    peer = nc.node_ranks[1 - node.Get_rank()]
    mine, peers = nc.allocate_shared(4096, peers=[peer])
    h_mine = mine.asarray(np.uint64, (2, 256))
    h_theirs = peers[peer].asarray(np.uint64, (2, 256))
    event = hip.hipEventCreateWithFlags(_IPC)
    theirs = nc.exchange_events(event, peers=[peer])[peer]

    def barrier_step(i: int) -> None:
        node.Barrier()

    def inplace_step(i: int) -> None:
        h_mine[i & 1, 0] = i
        node.Barrier()
        _check(int(h_theirs[i & 1, 0]), i, "in-place read")

    def event_step(i: int) -> None:
        h_mine[i & 1, 0] = i
        hip.hipEventRecord(event)  # the null stream: asynchronous, as GPU work would be
        node.Barrier()  # the peer's record happened before this
        hip.hipEventSynchronize(theirs, timeout=_TIMEOUT)
        _check(int(h_theirs[i & 1, 0]), i, "in-place read after an IPC event")

    return {"barrier": barrier_step, "inplace": inplace_step, "event": event_step}, event


def measure(
    quick: bool = False, progress: Callable[[str], None] | None = None
) -> dict[str, Any] | None:
    """Run every case on the two ranks of ``MPI.COMM_WORLD`` (collective); rank 0 gets the
    result (``{"name", "rows", "series"}``, see hipipc/bench.py), rank 1 None."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    say = progress if progress and comm.Get_rank() == 0 else (lambda _msg: None)
    if comm.Get_size() != 2:
        raise SystemExit(f"bench_mpi runs on 2 ranks (mpiexec -n 2), not {comm.Get_size()}")
    rows: list[dict[str, Any]] = []
    med: dict[int, dict[str, float]] = {}
    # One CPU per rank where there are two: a barrier between two ranks on one CPU measures
    # the scheduler.  Every method runs pinned alike.
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) >= 2:
        os.sched_setaffinity(0, {allowed[comm.Get_rank() % len(allowed)]})
    try:
        return _measure_pinned(comm, quick, say, rows, med)
    finally:
        os.sched_setaffinity(0, allowed)


def _measure_pinned(
    comm: MPI.Intracomm,
    quick: bool,
    say: Callable[[str], None],
    rows: list[dict[str, Any]],
    med: dict[int, dict[str, float]],
) -> dict[str, Any] | None:
    from hipipc.mpi import NodeComm

    with NodeComm(comm) as nc:
        if nc.num_nodes != 1:
            raise SystemExit("bench_mpi needs both ranks on one node (unset HIPIPC_MPI_NODES)")
        for size in SIZES:
            say(f"exchange {human_size(size)}")
            steps, free = _exchange_steps(nc, size)
            try:
                block = max(1, min(200, (4 * MiB) // size))
                rounds = (6 if size > MiB else 15) if quick else (15 if size > MiB else 40)
                med[size] = _timed(steps, block, rounds, nc.node)
            finally:
                free()
        say("in-place read, barrier, IPC event")
        steps, event = _sync_steps(nc)
        rounds = 30 if quick else 100
        try:
            # Two comparisons, each in its own rounds: the event step's thread hand-offs
            # must not disturb the in-place/barrier pair that has the tight target.
            sync = _timed({k: steps[k] for k in ("barrier", "inplace")}, 200, rounds, nc.node)
            ev = _timed({k: steps[k] for k in ("inplace", "event")}, 200, rounds, nc.node)
        finally:
            hip.hipDeviceSynchronize(timeout=_TIMEOUT)  # the event's records have run
    hip.hipEventDestroy(event)
    if comm.Get_rank() != 0:
        return None

    for size in SIZES:
        m, name = med[size], f"exchange {human_size(size)}: hipipc, double-buffered"
        small = size <= MiB
        rows.append(
            _row(
                name,
                m["hipipc"],
                "MPI-3 shared window, same pattern",
                m["window"],
                "<= 1.1x" if small else None,
                m["hipipc"] <= 1.1 * m["window"] if small else None,
            )
        )
        rows.append(
            _row(
                name,
                m["hipipc"],
                "comm.Sendrecv (numpy)",
                m["sendrecv"],
                "<= 0.5x" if size == MiB else None,
                m["hipipc"] <= 0.5 * m["sendrecv"] if size == MiB else None,
            )
        )
    rows.append(
        _row(
            "in-place neighbour read (8 B) + barrier",
            sync["inplace"],
            "bare barrier",
            sync["barrier"],
            "<= 1.15x",
            sync["inplace"] <= 1.15 * sync["barrier"],
        )
    )
    rows.append(
        _row(
            "in-place read ordered by an IPC event + barrier",
            ev["event"],
            "in-place read + barrier",
            ev["inplace"],
        )
    )
    rows.append(
        _row(
            "IPC event overhead per step (record + peer's synchronize)", ev["event"] - ev["inplace"]
        )
    )
    series = {
        "exchange": {
            "x_label": "message size (bytes)",
            "y_label": "time per exchange step (us)",
            "x": list(SIZES),
            "lines": {
                label: [med[s][key] for s in SIZES]
                for key, label in (
                    ("hipipc", "hipipc buffers"),
                    ("window", "MPI-3 shared window"),
                    ("sendrecv", "comm.Sendrecv"),
                )
            },
        }
    }
    return {"name": "mpi", "rows": rows, "series": series}


def _rank_main(argv: list[str] | None = None) -> int:
    """Under mpiexec: every rank measures; rank 0 prints the table and writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)
    result = measure(args.quick, progress=lambda m: print(f"... {m}", file=sys.stderr, flush=True))
    if result is not None:
        print(format_rows(result["rows"]), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0


# -- the launcher (hipipc bench, or this script without mpiexec) ---------------------------


def _mpiexec() -> list[str] | None:
    """The launcher command: the mpiexec beside this Python (the mpich wheel's), else PATH's.
    Open MPI refuses root and more ranks than cores unless told; MPICH needs no flags."""
    beside = Path(sys.executable).parent / "mpiexec"
    exe = str(beside) if beside.exists() else shutil.which("mpiexec")
    if exe is None:
        return None
    try:
        version = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return [exe]
    if "Open MPI" in version or "OpenRTE" in version:
        return [exe, "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return [exe]


def run(quick: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``mpiexec -n 2`` this script and return its result (see hipipc/bench.py); run inside
    an MPI job, measure directly.  Without mpi4py or mpiexec: no rows, and the reason."""
    if _under_mpiexec():
        return measure(quick, progress) or {"name": "mpi", "rows": [], "series": {}}
    say = progress or (lambda _msg: None)
    launcher = _mpiexec()
    if importlib.util.find_spec("mpi4py") is None or launcher is None:
        return {
            "name": "mpi",
            "rows": [],
            "series": {},
            "skipped": "needs mpi4py and mpiexec: pip install 'hipipc[mpi]'",
        }
    env = dict(os.environ)
    for var in ("HIPIPC_MPI_NODES", "HIPIPC_NODE_ID"):  # both ranks on this one node
        env.pop(var, None)
    package_root = str(Path(hip.__file__).resolve().parent.parent)  # the same hipipc
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="hipipc-bench-mpi-") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [
            *launcher,
            "-n",
            "2",
            sys.executable,
            "-m",
            "hipipc.benchmarks.bench_mpi",
            "--json",
            out,
            *(["--quick"] if quick else []),
        ]
        say("mpiexec -n 2 (" + ("quick" if quick else "full") + ")")
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            _, err = proc.communicate(timeout=300 if quick else 900)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate(timeout=30)
            raise RuntimeError(
                "mpiexec -n 2 hipipc.benchmarks.bench_mpi did not finish in time"
            ) from None
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(
                f"mpiexec -n 2 hipipc.benchmarks.bench_mpi failed (exit code "
                f"{proc.returncode}): {err.strip()[-2000:]}"
            )
        with open(out) as f:
            result: dict[str, Any] = json.load(f)  # written by rank 0 above
            return result


def main() -> int:
    """The command line: measure under a launcher, else launch ``mpiexec -n 2`` first."""
    if _under_mpiexec():
        return _rank_main()
    return script_main(run, (__doc__ or "").splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
