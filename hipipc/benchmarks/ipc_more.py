"""More cases of :mod:`hipipc.benchmarks.bench_ipc`, which runs them (this module is not a
benchmark of its own): handing an array to a freshly spawned worker (issue 15, target 2), and
the fd transport's open+close beside torch's ``file_descriptor`` strategy (issue 13, section
4).  The cases are described in bench_ipc's docstring."""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

import hipipc as hip
from hipipc.bench import next_request, start_child, stop_child
from hipipc.bench import row as _row
from hipipc.benchmarks.bench_ipc import (
    MiB,
    _median_us,
    _ns,
    _Peer,
    _time_floor,
    _time_hip_open,
)

__all__ = ["handoff_fresh_row", "fd_rows"]


# -- handing an array to a freshly spawned worker (issue 15, target 2) -------------------


def _fresh_child(conn: Connection) -> None:
    """A fresh worker: this module's imports (hipipc, numpy) are done when it says "ready";
    then it takes one array, through a handle or a pickle, checks it and answers with the
    times of its steps (perf_counter_ns, shared by the processes of a machine)."""
    conn.send("ready")
    try:
        if not conn.poll(120):
            return
        op, nbytes = conn.recv()
    except (EOFError, OSError):
        return  # the parent is gone
    try:
        if op == "hip":
            handle = conn.recv_bytes()
            t_recv = _ns()
            ptr = hip.hipIpcOpenMemHandle(handle)
            t_open = _ns()
            arr = hip.asarray(ptr, nbytes // 8, np.float64)
            t_array = _ns()
            ok = arr[0] == 0 and arr[-1] == nbytes // 8 - 1
            t_check = _ns()
            conn.send(
                (bool(ok), {"recv": t_recv, "open": t_open, "asarray": t_array, "check": t_check})
            )
            del arr
            hip.hipIpcCloseMemHandle(ptr)
        else:
            arr = conn.recv()
            t_recv = _ns()
            ok = arr[0] == 0 and arr[-1] == arr.size - 1
            conn.send((bool(ok), {"recv": t_recv, "check": _ns()}))
    except Exception as exc:  # the parent re-raises it
        conn.send(exc)
    conn.poll(60)  # the parent's goodbye: it stops the clock before this process exits


def _fresh_round(
    ctx: Any, method: str, nbytes: int, source: np.ndarray
) -> tuple[int, dict[str, Any]]:
    """One handoff to a new process: (nanoseconds from the send to the reply, the worker's
    step times relative to the send)."""
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_fresh_child, args=(child,), daemon=True)
    start_child(proc)
    child.close()
    ptr = 0
    try:
        if not conn.poll(120) or conn.recv() != "ready":
            raise TimeoutError("the fresh worker did not start within 120 s")
        if method == "hip":
            ptr = hip.hipMalloc(nbytes)
            hip.asarray(ptr, nbytes // 8, np.float64)[:] = source
            conn.send(("hip", nbytes))
            t0 = _ns()
            conn.send_bytes(bytes(hip.hipIpcGetMemHandle(ptr)))
        else:
            conn.send(("pickle", nbytes))
            t0 = _ns()
            conn.send(source)
        if not conn.poll(120):
            raise TimeoutError("the fresh worker gave no answer within 120 s")
        out = conn.recv()
        t1 = _ns()
        if isinstance(out, Exception):
            raise out
        ok, steps = out
        if not ok:
            raise RuntimeError(f"the fresh worker saw wrong data through {method}")
        return t1 - t0, {k: v - t0 for k, v in steps.items()}
    finally:
        stop_child(conn, proc)  # after it closed the handle: the memory can go
        if ptr:
            hip.hipFree(ptr)


def handoff_fresh_row(nbytes: int, rounds: int) -> dict[str, Any]:
    """The handoff of (d) to a freshly spawned worker, against pickling through the same Pipe
    to one: median of ``rounds`` rounds, the two methods taking turns to go first."""
    ctx = mp.get_context("spawn")
    source = np.arange(nbytes // 8, dtype=np.float64)
    times: dict[str, list[int]] = {"hip": [], "pickle": []}
    steps: dict[str, list[int]] = {}
    for i in range(rounds):
        for method in ("hip", "pickle") if i % 2 == 0 else ("pickle", "hip"):
            elapsed, marks = _fresh_round(ctx, method, nbytes, source)
            times[method].append(elapsed)
            if method == "hip":
                prev = 0
                for name in ("recv", "open", "asarray", "check"):
                    steps.setdefault(name, []).append(marks[name] - prev)
                    prev = marks[name]
                steps.setdefault("reply", []).append(elapsed - prev)
    hip_us, pickle_us = _median_us(times["hip"]), _median_us(times["pickle"])
    speedup = pickle_us / hip_us
    where = ", ".join(f"{name} {_median_us(v):.0f}" for name, v in steps.items())
    return _row(
        f"(d) hand {nbytes // MiB} MiB to a freshly spawned worker",
        hip_us,
        "pickle through the same Pipe to a fresh worker",
        pickle_us,
        ">= 5000x faster",
        ratio=speedup,
        met=speedup >= 5000,
        note=f"median of {rounds} alternating rounds, a new worker each (started, hipipc and "
        f"numpy imported before the clock); the worker's steps, median us: {where} (recv: "
        "export + 64 bytes through the Pipe; open and asarray: its first ones)",
    )


# -- the fd transport and torch's file_descriptor strategy (issue 13, section 4) --------


def _time_dupfd(dupfds: list[Any]) -> list[int]:
    """torch's ``file_descriptor`` sharing strategy without torch, per descriptor: take it
    from the sender's multiprocessing resource sharer (a connection with the authkey
    handshake, then SCM_RIGHTS), fstat, mmap, close both."""
    out = []
    for df in dupfds:
        t0 = _ns()
        fd = df.detach()
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size)
        os.close(fd)
        mm.close()
        out.append(_ns() - t0)
    return out


def _time_scm_open(raw: bytes, reps: int) -> list[int]:
    """fd-route opens through the exporter's SCM_RIGHTS server: this process's
    ``pidfd_getfd`` answers EPERM, as for another uid or a non-dumpable exporter."""
    import errno

    from hipipc import fdtransport

    def refused(pidfd: int, fd: int) -> int:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    real, fdtransport._pidfd_getfd = fdtransport._pidfd_getfd, refused
    try:
        return _time_hip_open(raw, reps)
    finally:
        fdtransport._pidfd_getfd = real


def _fd_child(conn: Connection) -> None:
    """The peer of the fd rows: times opens of either transport (and the fd transport's
    SCM_RIGHTS fallback), the floor and DupFd."""
    ops: dict[str, Callable[..., list[int]]] = {
        "hip_open": _time_hip_open,
        "scm_open": _time_scm_open,
        "floor": _time_floor,
        "dupfd": _time_dupfd,
    }
    while True:
        msg = next_request(conn)
        if msg is None:
            return
        op, args = msg
        try:
            conn.send(ops[op](*args))
        except Exception as exc:  # the parent re-raises it
            conn.send(exc)


def _fd_exporter(conn: Connection) -> None:
    """Started with HIPIPC_TRANSPORT=fd: export 1 MiB, send (its transport, the handle's
    bytes), keep the export alive until the parent says goodbye."""
    try:
        ptr = hip.hipMalloc(MiB)
        handle = hip.hipIpcGetMemHandle(ptr)
        conn.send((str(getattr(handle, "transport", "store")), bytes(handle)))
    except Exception as exc:  # an fd transport that cannot start: the rows are skipped
        conn.send(exc)
        return
    conn.poll(3600)
    hip.hipFree(ptr)


class _ChildProcess(_Peer):
    """A spawned process running ``target(conn)``, with ``env`` added to its environment
    (HIPIPC_TRANSPORT is read once per process: the child gets its own)."""

    def __init__(self, target: Callable[[Connection], None], env: dict[str, str] | None = None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child,), daemon=True)
        saved = {k: os.environ.get(k) for k in env or {}}
        try:
            os.environ.update(env or {})  # a spawned child starts with this environment
            start_child(self.proc)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()


def fd_rows(reps: int, tmpdir: str) -> list[dict[str, Any]]:
    """fd-route open+close of 1 MiB against the store transport's and the floor (skipped,
    with a note, while the fd transport is unavailable), and torch's file_descriptor
    strategy as a reported baseline."""
    from multiprocessing import reduction, resource_sharer

    rows = []
    peer = _ChildProcess(_fd_child)
    exporter = _ChildProcess(_fd_exporter, {"HIPIPC_TRANSPORT": "fd"})
    ptr = hip.hipMalloc(MiB)
    path = os.path.join(tmpdir, "floor-fd")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    memfd = os.memfd_create("bench-dupfd", os.MFD_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, MiB)
        os.posix_fallocate(memfd, 0, MiB)
        handle = hip.hipIpcGetMemHandle(ptr)
        store_kind = str(getattr(handle, "transport", "store"))
        try:
            fd_kind, fd_handle = exporter.reply()
            why = "" if fd_kind == "fd" else f"HIPIPC_TRANSPORT=fd exported a {fd_kind} handle"
        except Exception as exc:
            why = f"HIPIPC_TRANSPORT=fd failed: {type(exc).__name__}: {exc}"
        per_round = max(1, reps // 5)
        times: dict[str, list[int]] = {"fd": [], "scm": [], "store": [], "floor": [], "dupfd": []}
        # Rounds taking turns, so that drift on a shared machine hits every method alike.
        for _ in range(5):
            if not why:
                times["fd"] += peer.call("hip_open", fd_handle, per_round)
                times["scm"] += peer.call("scm_open", fd_handle, per_round)
            times["store"] += peer.call("hip_open", bytes(handle), per_round)
            times["floor"] += peer.call("floor", path, per_round)
            left = per_round
            while left:  # batches: each DupFd holds a descriptor until taken
                batch = [reduction.DupFd(memfd) for _ in range(min(left, 200))]
                times["dupfd"] += peer.call("dupfd", batch)
                left -= len(batch)
        med = {k: _median_us(v) for k, v in times.items() if v}
        case = "fd transport: open+close 1 MiB in another process"
        if why:
            rows.append(_row(case, None, note=f"skipped: fd transport unavailable ({why})"))
        else:
            rows.append(
                _row(
                    case,
                    med["fd"],
                    f"{store_kind} transport, same",
                    med["store"],
                    "<= 1x",
                    met=med["fd"] <= med["store"],
                )
            )
            rows.append(
                _row(
                    case,
                    med["fd"],
                    "os.open+fstat+mmap+close",
                    med["floor"],
                    "<= 1.5x",
                    met=med["fd"] <= 1.5 * med["floor"],
                    note="issue 13 asks <= 1.5x the floor; issue 15's target 4 asks <= 1.4x",
                )
            )
            rows.append(
                _row(
                    "fd transport through the SCM_RIGHTS fallback: open+close 1 MiB",
                    med["scm"],
                    "the pidfd_getfd route, same",
                    med["fd"],
                    note="reported: the route of another uid (share=) or a non-dumpable "
                    "exporter, forced here by refusing pidfd_getfd in the importer",
                )
            )
        rows.append(
            _row(
                "torch file_descriptor strategy (DupFd + fstat + mmap), 1 MiB memfd",
                med["dupfd"],
                "os.open+fstat+mmap+close",
                med["floor"],
                note="torch.multiprocessing's strategy on Linux, without torch: the sender "
                "dups the fd into multiprocessing's resource sharer, the receiver connects "
                "(authkey handshake) and takes it by SCM_RIGHTS; a reported baseline (the issue "
                "measured 15-22x the floor)",
            )
        )
    finally:
        peer.close()
        exporter.close()
        resource_sharer.stop(timeout=10)  # the descriptors of any DupFd not taken
        os.close(memfd)
        os.close(fd)
        os.unlink(path)
        hip.hipFree(ptr)
    return rows
