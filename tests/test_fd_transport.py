"""The fd transport (issue 13): memfds opened with pidfd_getfd, with real processes.

What differs from the store is the point here: no file anywhere, exit and kill -9 revoke at
once, the kernel's seals, the descriptor a handle costs.  The rules both transports share run
in test_runtime/test_lifetime on both (the ``transport`` fixture of conftest.py).
"""

from __future__ import annotations

import errno
import fcntl
import multiprocessing as mp
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from _proc import Exporter, child_env, in_fork, pattern, readline, run_json, store_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hipipc as hip
from hipipc.errors import hipError_t as E
from hipipc.fdtransport import FdTransport, fd_route_supported, own_description
from hipipc.handle import FdRoute
from hipipc.memfd import F_ADD_SEALS, F_SEAL_WRITE, SEALS, seals_of
from hipipc.segment import own_process

pytestmark = pytest.mark.skipif(not fd_route_supported(), reason="no fd transport here")

FD_ENV = {"HIPIPC_TRANSPORT": "fd"}
REFUSED = (E.hipErrorInvalidValue, E.hipErrorInvalidResourceHandle, E.hipErrorInvalidContext)
_TAIL = struct.Struct("<IQIQ")


def fd_exporter(sizes: list[int]) -> Exporter:
    return Exporter(sizes, env=child_env(**FD_ENV))


def route_of(raw: bytes) -> FdRoute:
    route = hip.IpcMemHandle(raw).fd_route
    assert route is not None
    return route


def with_route(raw: bytes, **changes: int) -> bytes:
    """``raw`` with fields of its fd route replaced."""
    return raw[:40] + _TAIL.pack(*route_of(raw)._replace(**changes))


def refused(raw: bytes) -> hip.HipError:
    with pytest.raises(hip.HipError) as exc:
        ptr = hip.hipIpcOpenMemHandle(raw)
        hip.hipIpcCloseMemHandle(ptr)  # pragma: no cover - only if the test fails
    return exc.value


def read(ptr: int, n: int) -> bytes:
    out = bytearray(n)
    hip.hipMemcpy(out, ptr, n, hip.hipMemcpyDeviceToHost)
    return bytes(out)


# -- end to end ---------------------------------------------------------------------------


def _pipe_importer(conn) -> None:
    import hipipc as hip

    raw = conn.recv()
    ptr = hip.hipIpcOpenMemHandle(raw)
    out = bytearray(8)
    hip.hipMemcpy(out, ptr, 8, hip.hipMemcpyDeviceToHost)
    hip.hipMemcpy(ptr + 8, b"imported", 8, hip.hipMemcpyHostToDevice)
    conn.send(bytes(out))
    conn.recv()  # the exporter has read our write
    hip.hipIpcCloseMemHandle(ptr)
    conn.send("closed")


def test_the_fd_route_end_to_end_both_ways_through_a_pipe():
    buf = hip.DeviceBuffer.allocate(4096, transport="fd")
    try:
        hip.hipMemcpy(buf.ptr, b"exported", 8, hip.hipMemcpyHostToDevice)
        handle = hip.hipIpcGetMemHandle(buf.ptr)
        assert handle.transport == "fd" and route_of(bytes(handle)).pid == os.getpid()
        assert bytes(hip.hipIpcGetMemHandle(buf.ptr)) == bytes(handle)  # stable
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe()
        child = ctx.Process(target=_pipe_importer, args=(theirs,))
        child.start()
        try:
            ours.send(bytes(handle))
            assert ours.poll(60), "importer did not answer"
            assert ours.recv() == b"exported"
            assert read(buf.ptr + 8, 8) == b"imported"
            ours.send("go")
            assert ours.poll(60) and ours.recv() == "closed"
            child.join(30)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
                child.join(10)
    finally:
        hip.hipFree(buf.ptr)


def test_the_process_choice_and_the_override(monkeypatch):
    from hipipc.fdtransport import reset_default_transport

    monkeypatch.setenv("HIPIPC_TRANSPORT", "store")
    reset_default_transport()
    try:
        ptr = hip.hipMalloc(64)
        assert hip.hipIpcGetMemHandle(ptr).transport == "store"
        hip.hipFree(ptr)
        buf = hip.DeviceBuffer.allocate(64, transport="fd")
        assert hip.hipIpcGetMemHandle(buf.ptr).transport == "fd"
        hip.hipFree(buf.ptr)
        monkeypatch.setenv("HIPIPC_TRANSPORT", "fd")  # read once: no effect until reset
        ptr = hip.hipMalloc(64)
        assert hip.hipIpcGetMemHandle(ptr).transport == "store"
        hip.hipFree(ptr)
        reset_default_transport()
        ptr = hip.hipMalloc(64)
        assert hip.hipIpcGetMemHandle(ptr).transport == "fd"
        hip.hipFree(ptr)
        with pytest.raises(hip.HipError) as exc:
            hip.DeviceBuffer.allocate(64, transport="carrier-pigeon")
        assert exc.value.code == E.hipErrorInvalidValue and "store, fd, auto" in str(exc.value)
        monkeypatch.setenv("HIPIPC_TRANSPORT", "bogus")
        reset_default_transport()
        with pytest.raises(hip.HipError) as exc:
            hip.hipMalloc(64)
        assert exc.value.code == E.hipErrorInvalidValue and "HIPIPC_TRANSPORT" in str(exc.value)
    finally:
        reset_default_transport()


def test_no_file_is_created_anywhere_in_fd_mode():
    before = set(os.listdir("/dev/shm"))
    had_store = os.path.isdir(store_path())
    with fd_exporter([4096]) as exporter:
        raw = exporter.handles[0]
        ptr = hip.hipIpcOpenMemHandle(raw)
        assert read(ptr, 16) == pattern(0, 16)
        new = set(os.listdir("/dev/shm")) - before
        name = hip.IpcMemHandle(raw).segment_name
        assert not any(name in entry for entry in new)
        if not had_store:  # another test of this run may have made the store; none of ours
            assert not os.path.isdir(store_path()) or not os.listdir(store_path())
        link = os.readlink(f"/proc/{exporter.pid}/fd/{route_of(raw).fd}")
        assert link.startswith("/memfd:hipipc"), link
        hip.hipIpcCloseMemHandle(ptr)


# -- revocation: kill -9, exit, hipFree -----------------------------------------------------


def test_kill_9_of_the_exporter_refuses_the_next_open_at_once_and_importers_keep_memory():
    exporter = fd_exporter([4096])
    try:
        raw = exporter.handles[0]
        ptr = hip.hipIpcOpenMemHandle(raw)
        os.kill(exporter.pid, signal.SIGKILL)
        exporter.proc.wait(30)
        # A second opener in a fresh process: refused at once, saying why.
        t0 = time.monotonic()
        got = run_json(
            f"""
            import json, hipipc as hip
            try:
                hip.hipIpcOpenMemHandle(bytes.fromhex("{raw.hex()}"))
                print(json.dumps("opened"))
            except hip.HipError as exc:
                print(json.dumps([exc.code.name, str(exc)]))
            """
        )
        assert got[0] == E.hipErrorInvalidResourceHandle.name and "exited" in got[1], got
        assert time.monotonic() - t0 < 30
        assert read(ptr, 4096) == pattern(0, 4096)  # the mapping outlives its exporter
        hip.hipIpcCloseMemHandle(ptr)
    finally:
        exporter.kill()


def test_a_killed_exporter_not_yet_reaped_is_refused_too():
    exporter = fd_exporter([4096])
    try:
        raw = exporter.handles[0]
        ptr = hip.hipIpcOpenMemHandle(raw)  # the pidfd is cached now
        hip.hipIpcCloseMemHandle(ptr)
        os.kill(exporter.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # a zombie: killed, not reaped
            with open(f"/proc/{exporter.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        err = refused(raw)
        assert err.code == E.hipErrorInvalidResourceHandle and "exited" in str(err)
    finally:
        exporter.kill()


_EXIT_RULE = """
import sys, hipipc as hip
ptr = hip.hipMalloc(4096)
print(bytes(hip.hipIpcGetMemHandle(ptr)).hex(), flush=True)
sys.stdin.readline()
hip.registry.get_registry()._at_exit()   # the exit rule, run early so that we can look
print("revoked", flush=True)
sys.stdin.readline()
"""


def test_the_exit_rule_revokes_fd_exports_and_exit_refuses_them():
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_EXIT_RULE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(**FD_ENV),
    )
    try:
        raw = bytes.fromhex(readline(proc.stdout, 60, "exporter").strip())
        ptr = hip.hipIpcOpenMemHandle(raw)
        hip.hipIpcCloseMemHandle(ptr)
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert readline(proc.stdout, 60, "exporter").strip() == "revoked"
        err = refused(raw)  # alive, but the rule closed the descriptor
        assert err.code == E.hipErrorInvalidResourceHandle and "revoked" in str(err)
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
        err = refused(raw)
        assert err.code == E.hipErrorInvalidResourceHandle and "exited" in str(err)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()


def test_hipfree_revokes_and_existing_importers_keep_their_memory():
    with fd_exporter([4096, 8192]) as exporter:
        raw = exporter.handles[0]
        ptr = hip.hipIpcOpenMemHandle(raw)
        assert exporter.command("free 0") == "freed"
        got = run_json(
            f"""
            import json, hipipc as hip
            try:
                hip.hipIpcOpenMemHandle(bytes.fromhex("{raw.hex()}"))
                print(json.dumps("opened"))
            except hip.HipError as exc:
                print(json.dumps([exc.code.name, str(exc)]))
            """
        )
        assert got[0] == E.hipErrorInvalidResourceHandle.name, got
        assert "freed" in got[1] or "stale" in got[1], got
        assert read(ptr, 4096) == pattern(0, 4096)
        hip.hipMemcpy(ptr, b"still mine", 10, hip.hipMemcpyHostToDevice)
        assert read(ptr, 10) == b"still mine"
        hip.hipIpcCloseMemHandle(ptr)
        other = hip.hipIpcOpenMemHandle(exporter.handles[1])  # the other export still opens
        hip.hipIpcCloseMemHandle(other)


# -- stale handles --------------------------------------------------------------------------


def test_stale_handles_wrong_inode_fd_number_or_start_time_are_refused():
    with fd_exporter([4096, 4096]) as exporter:
        raw, other = exporter.handles
        route = route_of(raw)
        err = refused(with_route(raw, inode=route.inode + 1))
        assert err.code == E.hipErrorInvalidResourceHandle and "stale" in str(err)
        # The number of the other export: a live memfd, but not this one.
        err = refused(with_route(raw, fd=route_of(other).fd))
        assert err.code == E.hipErrorInvalidResourceHandle and "stale" in str(err)
        err = refused(with_route(raw, fd=1))  # a pipe
        assert err.code == E.hipErrorInvalidResourceHandle and "stale" in str(err)
        err = refused(with_route(raw, fd=route.fd + 500))  # nothing open there
        assert err.code == E.hipErrorInvalidResourceHandle and "freed" in str(err)
        # A restarted exporter (or a reused pid): same pid, another start time.
        err = refused(with_route(raw, start=route.start + 1))
        assert err.code == E.hipErrorInvalidResourceHandle and "exited" in str(err)
        # Another live process (this one) under the exporter's fd and inode: refused.
        pid, start, _ = own_process()
        err = refused(with_route(raw, pid=pid, start=start))
        assert err.code == E.hipErrorInvalidResourceHandle


def test_a_handle_of_an_exporter_that_restarted_is_refused():
    with fd_exporter([4096]) as first:
        raw = first.handles[0]
    with fd_exporter([4096]) as second:
        # The new exporter likely holds its memfd at the same number: the pid and start time
        # of the old one are gone, and under the new pid the inode differs.
        err = refused(raw)
        assert err.code == E.hipErrorInvalidResourceHandle and "exited" in str(err)
        route = route_of(second.handles[0])
        err = refused(with_route(raw, pid=route.pid, start=route.start))
        assert err.code == E.hipErrorInvalidResourceHandle and "stale" in str(err)


# -- seals -----------------------------------------------------------------------------------


def test_an_importer_cannot_shrink_grow_or_seal_the_memory():
    with fd_exporter([4096]) as exporter:
        handle = hip.IpcMemHandle(exporter.handles[0])
        fd = FdTransport().open(handle)
        try:
            assert not os.get_inheritable(fd)  # pidfd_getfd made it close-on-exec
            assert seals_of(fd) & SEALS == SEALS
            size = os.fstat(fd).st_size
            for length in (0, 4096, size + 4096, 1 << 30):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, length)
            with pytest.raises(PermissionError):
                fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE)
            with pytest.raises(OSError) as exc:  # grow by fallocate past the end
                os.posix_fallocate(fd, size, 4096)
            assert exc.value.errno == errno.EPERM
            assert os.fstat(fd).st_size == size
        finally:
            os.close(fd)
        assert exporter.command("sum 0")  # the exporter is unharmed


_READER = """
import sys, time, hipipc as hip
ptr = hip.hipIpcOpenMemHandle(bytes.fromhex(sys.argv[1]))
n = int(sys.argv[2])
print("ready", flush=True)
out = bytearray(n)
end = time.monotonic() + 2.0
reads = 0
while time.monotonic() < end:
    hip.hipMemcpy(out, ptr, n, hip.hipMemcpyDeviceToHost)
    reads += 1
hip.hipIpcCloseMemHandle(ptr)
print("reads", reads, flush=True)
"""


def test_a_reader_never_gets_sigbus_while_a_writer_tries_to_truncate():
    n = 1 << 20
    with fd_exporter([n]) as exporter:
        raw = exporter.handles[0]
        reader = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_READER), raw.hex(), str(n)],
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        try:
            assert readline(reader.stdout, 60, "reader").strip() == "ready"
            fd = FdTransport().open(hip.IpcMemHandle(raw))
            try:
                refusals = 0
                end = time.monotonic() + 1.5
                while time.monotonic() < end:
                    for length in (0, 4096, n // 2):
                        try:
                            os.ftruncate(fd, length)
                        except PermissionError:
                            refusals += 1
            finally:
                os.close(fd)
            assert refusals > 0
            assert readline(reader.stdout, 60, "reader").startswith("reads")
            assert reader.wait(30) == 0  # not -SIGBUS
        finally:
            if reader.poll() is None:
                reader.kill()
            reader.wait(10)
            reader.stdout.close()


# -- descriptors -----------------------------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_descriptor_leaks_over_ten_thousand_open_close_cycles():
    with fd_exporter([4096]) as exporter:
        raw = exporter.handles[0]
        hip.hipIpcCloseMemHandle(hip.hipIpcOpenMemHandle(raw))  # the pidfd is cached now
        before = _fd_count()
        for _ in range(10_000):
            hip.hipIpcCloseMemHandle(hip.hipIpcOpenMemHandle(raw))
        assert _fd_count() == before
        for _ in range(100):  # refused opens leak nothing either
            refused(with_route(raw, inode=1))
        assert _fd_count() == before


def test_a_subprocess_started_after_an_open_inherits_no_descriptor():
    with fd_exporter([4096]) as exporter:
        ptr = hip.hipIpcOpenMemHandle(exporter.handles[0])
        ev = hip.hipEventCreateWithFlags(hip.hipEventInterprocess | hip.hipEventDisableTiming)
        buf = hip.DeviceBuffer.allocate(4096, transport="fd")
        hip.hipIpcGetMemHandle(buf.ptr)
        try:
            out = subprocess.run(
                ["ls", "-l", "/proc/self/fd/"], capture_output=True, close_fds=False, timeout=30
            ).stdout.decode()
        finally:
            hip.hipFree(buf.ptr)
            hip.hipEventDestroy(ev)
            hip.hipIpcCloseMemHandle(ptr)
        assert "memfd" not in out and "pidfd" not in out, out


def test_own_description_does_not_share_the_exporters_file_offset():
    buf = hip.DeviceBuffer.allocate(4096, transport="fd")
    try:
        route = route_of(bytes(hip.hipIpcGetMemHandle(buf.ptr)))
        mine = own_description(route.fd)
        try:
            os.lseek(route.fd, 123, os.SEEK_SET)
            assert os.lseek(mine, 0, os.SEEK_CUR) == 0  # a description of its own
            assert os.fstat(mine).st_ino == route.inode
        finally:
            os.lseek(route.fd, 0, os.SEEK_SET)
            os.close(mine)
    finally:
        hip.hipFree(buf.ptr)


_EVENT_IMPORTER = """
import sys, hipipc as hip
ev = hip.hipIpcOpenEventHandle(bytes.fromhex(sys.argv[1]))
for _ in range(50):
    hip.hipEventRecord(ev, None)
hip.hipEventSynchronize(ev, timeout=30)
hip.hipEventDestroy(ev)
print("ok", flush=True)
"""


def test_interprocess_events_work_in_fd_mode(monkeypatch):
    from hipipc.fdtransport import reset_default_transport

    monkeypatch.setenv("HIPIPC_TRANSPORT", "fd")
    reset_default_transport()
    try:
        ev = hip.hipEventCreateWithFlags(hip.hipEventInterprocess | hip.hipEventDisableTiming)
        handle = hip.hipIpcGetEventHandle(ev)
        assert handle.transport == "fd"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(_EVENT_IMPORTER), bytes(handle).hex()],
                stdout=subprocess.PIPE,
                env=child_env(),
            )
            for _ in range(2)
        ]
        try:
            for _ in range(50):
                hip.hipEventRecord(ev, None)
            for proc in procs:
                assert readline(proc.stdout, 60, "event importer").strip() == "ok"
                assert proc.wait(30) == 0
            hip.hipEventSynchronize(ev, timeout=30)
            assert hip.hipEventQuery(ev) == E.hipSuccess
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)
                proc.stdout.close()
        hip.hipEventDestroy(ev)
        err = None
        try:
            hip.hipIpcOpenEventHandle(handle)
        except hip.HipError as exc:
            err = exc
        assert err is not None and err.code in REFUSED
    finally:
        reset_default_transport()


_SCALE = """
import json, os, resource, sys
import hipipc as hip
n = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
out = {"hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}
try:
    ptrs = [hip.hipMalloc(64) for _ in range(n)]
    handles = [hip.hipIpcGetMemHandle(p) for p in ptrs]
    out["exported"] = len(handles)
    out["soft"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    for p in ptrs:
        hip.hipFree(p)
except hip.HipError as exc:
    out["error"] = [exc.code.name, str(exc)]
print(json.dumps(out))
"""


def test_thousands_of_fd_exports_fit_a_soft_limit_of_1024():
    n = 3000
    got = run_json(_SCALE, str(n), env=child_env(**FD_ENV), timeout=120)
    if got["hard"] >= n + 64:
        assert got.get("exported") == n, got
        assert n < got["soft"] <= got["hard"]
    else:
        assert got["error"][0] == "hipErrorOutOfMemory" and "RLIMIT_NOFILE" in got["error"][1]


_EXHAUST = """
import json, resource
import hipipc as hip
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
ptrs, out = [], {}
try:
    while len(ptrs) < 1000:
        ptrs.append(hip.hipMalloc(64))
        hip.hipIpcGetMemHandle(ptrs[-1])
except hip.HipError as exc:
    out["error"] = [exc.code.name, str(exc)]
out["exported"] = len(ptrs)
for ptr in ptrs:
    hip.hipFree(ptr)
ptrs = [hip.hipMalloc(64) for _ in range(10)]   # freeing gave the descriptors back
print(json.dumps(out))
"""


def test_descriptor_exhaustion_in_fd_mode_is_out_of_memory_naming_the_limit():
    got = run_json(_EXHAUST, env=child_env(**FD_ENV))
    code, message = got["error"]
    assert code == "hipErrorOutOfMemory" and "RLIMIT_NOFILE soft=64, hard=64" in message
    assert 40 < got["exported"] < 64


# -- fork --------------------------------------------------------------------------------------


def _forked_child(ptr: int, raw: bytes) -> dict:
    route = route_of(raw)
    out: dict = {}
    try:
        hip.hipFree(ptr)
        out["free"] = "freed"
    except hip.HipError as exc:
        out["free"] = exc.code.name
    try:  # the inherited copy of the parent's export is closed: the child keeps nothing
        out["inherited"] = os.fstat(route.fd).st_ino == route.inode
    except OSError:
        out["inherited"] = False
    theirs = hip.hipIpcOpenMemHandle(raw)  # the parent's export, opened like anyone's
    out["data"] = read(theirs, 8).hex()
    hip.hipIpcCloseMemHandle(theirs)
    mine = hip.DeviceBuffer.allocate(4096, transport="fd")
    own = hip.hipIpcGetMemHandle(mine.ptr)
    out["own_pid"] = route_of(bytes(own)).pid == os.getpid()
    out["own_open"] = os.fstat(route_of(bytes(own)).fd).st_ino == route_of(bytes(own)).inode
    hip.hipFree(mine.ptr)
    return out


def test_a_forked_child_frees_nothing_of_its_parent_and_exports_its_own():
    buf = hip.DeviceBuffer.allocate(4096, transport="fd")
    try:
        hip.hipMemcpy(buf.ptr, b"parental", 8, hip.hipMemcpyHostToDevice)
        raw = bytes(hip.hipIpcGetMemHandle(buf.ptr))
        got = in_fork(_forked_child, buf.ptr, raw)
        assert got == {
            "free": "hipErrorInvalidValue",
            "inherited": False,
            "data": b"parental".hex(),
            "own_pid": True,
            "own_open": True,
        }
        route = route_of(raw)
        assert os.fstat(route.fd).st_ino == route.inode  # the parent's export is intact
        got = run_json(
            f"""
            import json, hipipc as hip
            p = hip.hipIpcOpenMemHandle(bytes.fromhex("{raw.hex()}"))
            out = bytearray(8)
            hip.hipMemcpy(out, p, 8, hip.hipMemcpyDeviceToHost)
            print(json.dumps(out.decode()))
            """
        )
        assert got == "parental"
    finally:
        hip.hipFree(buf.ptr)


# -- garbage -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_fd():
    with fd_exporter([4096, 3 * 4096 + 123]) as exporter:
        yield exporter


def _refused_or_why(raw: bytes) -> hip.HipError | str:
    try:
        ptr = hip.hipIpcOpenMemHandle(raw)
    except hip.HipError as exc:
        return exc if exc.code in REFUSED else f"wrong code {exc.code.name}: {exc}"
    except BaseException as exc:  # anything else is a bug
        return f"{type(exc).__name__}: {exc}"
    hip.hipIpcCloseMemHandle(ptr)
    return "opened"


_FIXTURE_OK = [HealthCheck.function_scoped_fixture]


@settings(max_examples=300, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(
    tail=st.binary(min_size=24, max_size=24),
    fd=st.one_of(st.integers(0, 64), st.integers(0, 2**31 - 1)),
    inode=st.integers(1, 2**64 - 1),
    live_route=st.booleans(),
    which=st.integers(0, 1),
)
def test_random_tails_on_fd_handles_are_refused(live_fd, tail, fd, inode, live_route, which):
    raw = live_fd.handles[which]
    if live_route:  # the live exporter's pid and start: the kernel is asked for ``fd``
        route = route_of(raw)
        tail = _TAIL.pack(route.pid, route.start, fd, inode)
    if tail == raw[40:]:
        return
    before = _fd_count()
    result = _refused_or_why(raw[:40] + tail)
    assert isinstance(result, hip.HipError), result
    assert _fd_count() <= before + 1  # at most one pidfd more in the cache


@settings(max_examples=300, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(bit=st.integers(0, 64 * 8 - 1), which=st.integers(0, 1))
def test_flipped_bits_of_fd_handles_are_refused(live_fd, bit, which):
    raw = bytearray(live_fd.handles[which])
    raw[bit // 8] ^= 1 << (bit % 8)
    result = _refused_or_why(bytes(raw))
    assert isinstance(result, hip.HipError), result


# -- the fallback to the exporter's descriptor server (its wiring; the server is fdserver's) --


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.EACCES, errno.ENOSYS])
def test_a_refused_pidfd_getfd_asks_the_exporters_server_and_checks_what_it_sends(
    monkeypatch, refusal
):
    from hipipc import fdserver, fdtransport

    real = fdtransport._pidfd_getfd
    with fd_exporter([4096]) as exporter:
        raw = exporter.handles[0]
        route = route_of(raw)
        asked = []

        def refuse(pidfd: int, fd: int) -> int:
            raise OSError(refusal, os.strerror(refusal))

        def server(pid, start, uid, key, timeout=5.0):  # sends what a server would: the file
            asked.append((pid, start, uid, key))
            pidfd = os.pidfd_open(pid)
            try:
                return real(pidfd, route.fd)
            finally:
                os.close(pidfd)

        monkeypatch.setattr(fdtransport, "_pidfd_getfd", refuse)
        monkeypatch.setattr(fdserver, "fetch", server)
        ptr = hip.hipIpcOpenMemHandle(raw)
        assert read(ptr, 64) == pattern(0, 64)
        hip.hipIpcCloseMemHandle(ptr)
        assert asked == [(route.pid, route.start, os.geteuid(), hip.IpcMemHandle(raw).segment_name)]

        # What the server sends goes through the same checks: another file is refused.
        monkeypatch.setattr(fdserver, "fetch", lambda *a, **k: os.memfd_create("x", os.MFD_CLOEXEC))
        err = refused(raw)
        assert err.code == E.hipErrorInvalidResourceHandle and "stale" in str(err)

        def no_server(*args, **kwargs):
            raise hip.HipError(E.hipErrorInvalidResourceHandle, "not offered")

        monkeypatch.setattr(fdserver, "fetch", no_server)
        err = refused(raw)
        assert err.code == E.hipErrorInvalidResourceHandle
        assert "pidfd_getfd refused" in str(err) and "not offered" in str(err)


def test_hipipc_info_shows_the_transport():
    import json

    for value, shown in (("fd", "fd"), ("auto", "fd"), (None, "store")):
        out = subprocess.run(
            [sys.executable, "-m", "hipipc", "info", "--json"],
            capture_output=True,
            timeout=60,
            env=child_env(HIPIPC_TRANSPORT=value),
        )
        assert out.returncode == 0, out.stderr.decode()
        info = json.loads(out.stdout)
        assert info["transport"] == shown and info["fd_transport_supported"] is True


def test_the_route_tail_parses_by_the_design_rules():
    from hipipc.handle import HandleKind

    good = FdRoute(pid=4194304, start=1, fd=2**31 - 1, inode=1)
    handle = hip.IpcMemHandle.new(HandleKind.HOST_MEMORY, 4096, 0, os.geteuid(), good)
    assert handle.transport == "fd" and handle.fd_route == good
    assert hip.IpcMemHandle(bytes(handle)).fd_route == good  # round trip
    plain = hip.IpcMemHandle.new(HandleKind.HOST_MEMORY, 4096, 0, os.geteuid())
    assert plain.transport == "store" and plain.fd_route is None
    for bad in (
        good._replace(pid=0),
        good._replace(pid=4194305),
        good._replace(start=0),
        good._replace(fd=2**31),
        good._replace(inode=0),
    ):
        with pytest.raises(hip.HipError) as exc:
            hip.IpcMemHandle(bytes(plain)[:40] + _TAIL.pack(*bad))
        assert exc.value.code == E.hipErrorInvalidValue and "reserved bytes" in str(exc.value)
    for bad in ((1, 2, 3, 4), "route", good._replace(pid=-1), good._replace(inode=2**64)):
        with pytest.raises(hip.HipError) as exc:
            hip.IpcMemHandle.new(HandleKind.HOST_MEMORY, 4096, 0, 0, bad)
        assert exc.value.code == E.hipErrorInvalidValue


def test_an_fd_exporter_whose_main_thread_exited_is_alive_and_serves_its_exports():
    """A main thread that called pthread_exit leaves the process running (its other threads
    hold the exports); pidfd_getfd finds no descriptor table through the zombie leader, so the
    open goes through the exporter's descriptor server instead of calling it dead."""
    from test_review_security import MAIN_THREAD_EXITS

    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN_THREAD_EXITS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(HIPIPC_TRANSPORT="fd"),
    )
    try:
        raw = bytes.fromhex(readline(proc.stdout, 60, "exporter"))
        assert hip.IpcMemHandle(raw).transport == "fd"
        deadline = time.monotonic() + 30
        while True:  # the leader turns "Z" once its pthread_exit has run
            with open(f"/proc/{proc.pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            assert time.monotonic() < deadline, "the exporter's main thread did not exit"
            time.sleep(0.01)
        ptr = hip.hipIpcOpenMemHandle(raw)
        hip.hipIpcCloseMemHandle(ptr)
        proc.stdin.write(b"done\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
        with pytest.raises(hip.HipError) as info:
            hip.hipIpcOpenMemHandle(raw)
        assert info.value.code == hip.hipErrorInvalidHandle
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
