"""The fd transport's SCM_RIGHTS fallback (hipipc.fdserver): real processes, real sockets.

Exporters and importers are forked children (a child that drops to another uid cannot exec an
interpreter under /root, BRIEF section 11); every wait is bounded and children are killed on
failure.  Root runs the suite: the cross-uid cases drop a child to nobody (65534) with its
supplementary groups cleared, so the checks are as strict as for a real other user.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import resource
import select
import signal
import socket
import struct
import threading
import time
import traceback
import warnings

import pytest
from _proc import in_fork, run_python, wait_pid

import hipipc.fdserver as fs
from hipipc.errors import HipError, hipError_t
from hipipc.memfd import create_memfd
from hipipc.segment import own_process
from hipipc.transport import send_fds

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="drops a child to another uid")

NOBODY = 65534
UID = os.geteuid()
PAGE = 4096
PATTERN = bytes(range(256)) * 16
INVALID_HANDLE = hipError_t.hipErrorInvalidResourceHandle
_libc = ctypes.CDLL(None, use_errno=True)


def key(i: int | str) -> str:
    return hashlib.blake2b(str(i).encode(), digest_size=20).hexdigest()


def memfd() -> int:
    fd = create_memfd(PAGE)
    os.pwrite(fd, PATTERN, 0)
    return fd


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def drop(uid: int = NOBODY, gid: int = NOBODY, groups: tuple[int, ...] = ()) -> None:
    """Become another user for real: supplementary groups first, then gid, then uid."""
    os.setgroups(list(groups))
    os.setgid(gid)
    os.setuid(uid)


def pidfd_getfd(pid: int, fd: int) -> int:
    """0 if pidfd_getfd(pid, fd) gives a descriptor (closed at once), else its errno."""
    pidfd = os.pidfd_open(pid)
    try:
        got = _libc.syscall(ctypes.c_long(438), ctypes.c_long(pidfd), ctypes.c_long(fd), 0)
        if got < 0:
            return ctypes.get_errno()
        os.close(got)
        return 0
    finally:
        os.close(pidfd)


def set_dumpable(on: bool) -> None:
    if _libc.prctl(ctypes.c_int(4), ctypes.c_ulong(int(on)), 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl")


def read_all(fd: int) -> bytes:
    return os.pread(fd, len(PATTERN), 0)


def refused(call, *args, **kw) -> str:
    with pytest.raises(HipError) as info:
        call(*args, **kw)
    assert info.value.code == INVALID_HANDLE, info.value
    return str(info.value)


@pytest.fixture(autouse=True)
def _clean_server():
    """Each test starts and ends without offers or a server thread in this process."""
    fs.withdraw_all()
    yield
    fs.withdraw_all()
    assert not [t for t in threading.enumerate() if t.name == "hipipc-fdserver"]


# -- forked children driven by one-line commands -------------------------------------------


class Child:
    """A forked child running ``body(ask, answer, *args)``: ``ask()`` reads the parent's next
    command (a list of words, [] at EOF), ``answer(obj)`` sends one JSON line back."""

    def __init__(self, body, *args) -> None:
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 70
            try:
                os.close(cmd_w)
                os.close(out_r)
                answer = lambda obj: os.write(out_w, json.dumps(obj).encode() + b"\n")  # noqa: E731
                body(_reader(cmd_r), answer, *args)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(cmd_r)
        os.close(out_w)
        self.pid, self._w, self._r, self._buf = pid, cmd_w, out_r, b""

    def read(self, timeout: float = 20.0):
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise AssertionError(f"child {self.pid} did not answer in {timeout} s")
            chunk = os.read(self._r, 65536)
            if not chunk:
                raise AssertionError(f"child {self.pid} ended early")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, *words, timeout: float = 20.0):
        os.write(self._w, " ".join(map(str, words)).encode() + b"\n")
        return self.read(timeout)

    def close(self, kill: bool = False) -> int:
        if kill:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass
        return wait_pid(self.pid, 20)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        code = self.close(kill=exc_type is not None)
        if exc_type is None:
            assert code == 0, f"child exited {code}"


def _reader(fd: int):
    buf = [b""]

    def ask() -> list[str]:
        while b"\n" not in buf[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                return []
            buf[0] += chunk
        line, buf[0] = buf[0].split(b"\n", 1)
        return line.decode().split()

    return ask


def exporter(ask, answer, uid=None, dumpable=None) -> None:
    """Commands: offer KEY MODE ONCE, withdraw KEY, pending KEY, dumpable 0|1, withdraw_all."""
    if uid is not None:
        drop(uid)
    if dumpable is not None:
        set_dumpable(dumpable)
    fd = memfd()
    answer({"fd": fd, "ino": os.fstat(fd).st_ino, "start": own_process()[1]})
    while cmd := ask():
        try:
            if cmd[0] == "offer":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("error" if cmd[4:] == ["strict"] else "always")
                    fs.offer(cmd[1], fd, int(cmd[2], 8), once=cmd[3] == "1")
                answer({"warnings": [str(w.message) for w in caught]})
            elif cmd[0] == "withdraw":
                answer(fs.withdraw(cmd[1]))
            elif cmd[0] == "pending":
                answer(fs.pending(cmd[1]))
            elif cmd[0] == "dumpable":
                answer(set_dumpable(cmd[1] == "1"))
            elif cmd[0] == "withdraw_all":
                answer(fs.withdraw_all())
            elif cmd[0] == "client_seconds":  # a shorter request deadline, for a fast test
                fs._CLIENT_SECONDS = float(cmd[1])
                answer(None)
            elif cmd[0] == "limit":  # leave only N free descriptors, for good
                n = fd_count() + int(cmd[1])
                answer(resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)))
            elif cmd[0] == "quit":
                answer("bye")
                return
        except Exception as exc:
            answer({"error": repr(exc)})


def start_exporter(*args) -> tuple[Child, dict]:
    child = Child(exporter, *args)
    try:
        return child, child.read()
    except BaseException:
        child.close(kill=True)
        raise


# -- the basic contract --------------------------------------------------------------------


def test_offer_fetch_across_processes_and_revoke():
    with Child(exporter) as exp:
        info = exp.read()
        assert exp.ask("offer", key(1), "600", 0) == {"warnings": []}
        assert exp.ask("pending", key(1)) is True
        before = fd_count()
        fd = fs.fetch(exp.pid, info["start"], UID, key(1), timeout=10)
        try:
            assert os.fstat(fd).st_ino == info["ino"]
            assert read_all(fd) == PATTERN
            assert not os.get_inheritable(fd)  # MSG_CMSG_CLOEXEC
        finally:
            os.close(fd)
        assert fd_count() == before
        exp.ask("withdraw", key(1))
        assert exp.ask("pending", key(1)) is False
        assert "no longer offers" in refused(fs.fetch, exp.pid, info["start"], UID, key(1))
        assert "no longer offers" in refused(fs.fetch, exp.pid, info["start"], UID, key(2))
        exp.ask("withdraw", key(3))  # unknown key: no-op
        exp.ask("quit")
    # The exporter is gone: refused, and the message says so.
    assert "exited" in refused(fs.fetch, exp.pid, info["start"], UID, key(1))


def test_once_keys_and_references():
    """Exports borrow the caller's descriptor (one descriptor per export); once-keys hold
    one reference per distinct file, shared, closed with the last once-key."""
    fd, other = memfd(), memfd()
    pid, start, _ = own_process()
    try:
        base = fd_count()
        fs.offer(key("a"), fd, 0o600)
        with_server = fd_count()  # the listener and the wake pair: no reference of its own
        fs.offer(key("c"), fd, 0o666)
        fs.offer(key("d"), other, 0o600)
        assert fd_count() == with_server
        fs.offer(key("b"), fd, 0o600, once=True)
        fs.offer(key("e"), fd, 0o600, once=True)
        assert fd_count() == with_server + 1  # one reference for both once-keys
        fs.offer(key("f"), other, 0o600, once=True)
        assert fd_count() == with_server + 2
        assert fs.pending(key("b"))
        got = fs.fetch(pid, start, UID, key("b"))
        os.close(got)
        # Consumed by the first successful send: the server thread drops the key just after
        # its send returns, which may be just after this process received the descriptor.
        deadline = time.monotonic() + 5
        while fs.pending(key("b")) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert not fs.pending(key("b"))
        assert "no longer offers" in refused(fs.fetch, pid, start, UID, key("b"))
        assert fd_count() == with_server + 2  # "e" still holds fd's reference
        fs.offer(key("f"), fd, 0o600, once=True)  # re-offered for another file: moved
        assert fd_count() == with_server + 1
        fs.offer(key("d"), fd, 0o600)  # an export re-offered for another file
        got = fs.fetch(pid, start, UID, key("d"))
        assert os.fstat(got).st_ino == os.fstat(fd).st_ino
        os.close(got)
        for k in "ef":
            fs.withdraw(key(k))
        assert fd_count() == with_server  # the last once-key closed the reference
        assert fs.pending(key("a")) and fs.pending(key("c"))
        fs.withdraw_all()
        assert fd_count() == base
    finally:
        os.close(fd)
        os.close(other)


def test_a_ticket_outlives_the_exporters_close_and_a_closed_export_sends_nothing():
    """hipFree withdraws and closes the export; a pending ticket still has its own reference.
    An export closed without withdraw (a caller's bug) is dropped at the next request, even
    when its number names another file by then: that file is never sent."""
    fd, stranger = memfd(), memfd()
    pid, start, _ = own_process()
    try:
        ino = os.fstat(fd).st_ino
        fs.offer(key("export"), fd, 0o600)
        fs.offer(key("ticket"), fd, 0o600, once=True)
        fs.withdraw(key("export"))
        os.close(fd)
        fd = -1
        got = fs.fetch(pid, start, UID, key("ticket"))
        assert os.fstat(got).st_ino == ino
        os.close(got)
        again = memfd()
        fs.offer(key("closed"), again, 0o600)
        os.dup2(stranger, again)  # the number now names another file, without withdraw
        assert "no longer offers" in refused(fs.fetch, pid, start, UID, key("closed"))
        assert not fs.pending(key("closed"))
        fs.offer(key("closed"), again, 0o600)
        os.close(again)  # closed without withdraw: the number names nothing
        assert "no longer offers" in refused(fs.fetch, pid, start, UID, key("closed"))
        assert not fs.pending(key("closed"))
    finally:
        for x in (fd, stranger):
            if x >= 0:
                os.close(x)


def _abstract_names() -> str:
    with open("/proc/net/unix") as f:
        return f.read()


def test_withdraw_all_stops_the_server_and_frees_the_name():
    fd = memfd()
    pid, start, _ = own_process()
    try:
        base = fd_count()
        fs.offer(key(1), fd, 0o600)
        name = fs.socket_name(UID, pid, start)[1:].decode()
        assert "@" + name in _abstract_names()
        assert [t for t in threading.enumerate() if t.name == "hipipc-fdserver"]
        fs.withdraw_all()
        fs.withdraw_all()  # idempotent
        assert not fs.pending(key(1))
        assert "@" + name not in _abstract_names()
        assert not [t for t in threading.enumerate() if t.name == "hipipc-fdserver"]
        assert fd_count() == base
        assert "serves no descriptors" in refused(fs.fetch, pid, start, UID, key(1))
        fs.offer(key(1), fd, 0o600)  # a later offer starts a new server
        os.close(fs.fetch(pid, start, UID, key(1)))
    finally:
        os.close(fd)


EXIT_SCRIPT = """
import atexit, sys
import hipipc.fdserver as fs
from hipipc.memfd import create_memfd
fd = create_memfd(4096)
if sys.argv[1] == "rule":
    atexit.register(fs.withdraw_all)
fs.offer("ab" * 20, fd, 0o600)
print("offered", flush=True)
"""


@pytest.mark.parametrize("how", ["rule", "no-rule"])
def test_interpreter_exit_with_a_live_server(how):
    t0 = time.monotonic()
    proc = run_python(EXIT_SCRIPT, how, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "offered"
    assert not proc.stderr, proc.stderr.decode()
    assert time.monotonic() - t0 < 30


def test_arguments_are_checked():
    fd = memfd()
    r, w = os.pipe()
    try:
        for bad in ("A" * 40, "a" * 39, b"a" * 40, None, "g" * 40):
            for call in (lambda k: fs.offer(k, fd, 0o600), fs.withdraw, fs.pending):
                with pytest.raises(HipError) as info:
                    call(bad)
                assert info.value.code == hipError_t.hipErrorInvalidValue
        for args in ((fd, 0o644), (fd, 0o700), (fd, True), (-1, 0o600), (r, 0o600), (9999, 0o600)):
            with pytest.raises(HipError) as info:
                fs.offer(key(1), *args)
            assert info.value.code == hipError_t.hipErrorInvalidValue, args
        good = (os.getpid(), own_process()[1], UID, key(1))
        for i, bad in ((0, 0), (0, 2**23), (1, 0), (2, -1), (2, 2**32), (3, "x"), (0, True)):
            args = list(good)
            args[i] = bad
            with pytest.raises(HipError) as info:
                fs.fetch(*args)
            assert info.value.code == hipError_t.hipErrorInvalidValue, args
        for timeout in (-1, float("nan"), "1"):
            with pytest.raises(HipError) as info:
                fs.fetch(*good, timeout=timeout)
            assert info.value.code == hipError_t.hipErrorInvalidValue
        assert not fs.pending(key(1))
    finally:
        for x in (fd, r, w):
            os.close(x)


# -- cross-uid: the share policy, and why the fallback exists ------------------------------


@pytest.mark.parametrize(
    "mode, gid, groups, allowed",
    [
        (0o600, NOBODY, (), False),
        (0o660, NOBODY, (), False),
        (0o660, NOBODY, (0,), True),  # a supplementary group (SO_PEERGROUPS)
        (0o660, 0, (), True),  # the primary group
        (0o666, NOBODY, (), True),
    ],
)
@needs_root
def test_cross_uid_share_policy(mode, gid, groups, allowed):
    fd = memfd()
    pid, start, _ = own_process()
    try:
        fs.offer(key(mode), fd, mode)
        ino = os.fstat(fd).st_ino

        def importer():
            drop(NOBODY, gid, groups)
            try:
                got = fs.fetch(pid, start, UID, key(mode), timeout=10)
            except HipError as exc:
                return [int(exc.code), str(exc)]
            try:
                return [0, os.fstat(got).st_ino == ino and read_all(got) == PATTERN]
            finally:
                os.close(got)

        code, detail = in_fork(importer)
        if allowed:
            assert (code, detail) == (0, True)
        else:
            assert code == INVALID_HANDLE
            assert "HIPIPC_SHARE" in detail and "uid 65534" in detail, detail
        assert fs.pending(key(mode))  # a refusal consumes nothing
    finally:
        os.close(fd)


@needs_root
def test_pidfd_getfd_is_refused_across_uids():
    """Why the fallback exists: the kernel's ptrace check refuses another uid."""
    fd = memfd()
    try:
        assert in_fork(pidfd_getfd, os.getpid(), fd) == 0  # same uid (root): allowed

        def other_uid():
            drop()
            return pidfd_getfd(os.getppid(), fd)

        assert in_fork(other_uid) == errno.EPERM
    finally:
        os.close(fd)


@needs_root
def test_non_dumpable_exporter_is_served():
    """A non-dumpable exporter refuses pidfd_getfd even to its own (non-root) uid; fetch
    still works there.  Making it dumpable again lets pidfd_getfd in: the flag is the cause."""
    exp, info = start_exporter(NOBODY, False)
    with exp:
        assert exp.ask("offer", key(1), "600", 0) == {"warnings": []}

        def importer():
            drop()
            denied = pidfd_getfd(exp.pid, info["fd"])
            got = fs.fetch(exp.pid, info["start"], NOBODY, key(1), timeout=10)
            try:
                return [denied, os.fstat(got).st_ino == info["ino"]]
            finally:
                os.close(got)

        assert in_fork(importer) == [errno.EPERM, True]
        exp.ask("dumpable", 1)
        assert in_fork(lambda: (drop(), pidfd_getfd(exp.pid, info["fd"]))[1]) == 0
        exp.ask("withdraw_all")


# -- squatters and hostile servers ---------------------------------------------------------


def squatter(ask, answer, name: bytes, uid=None) -> None:
    if uid is not None:
        drop(uid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(name)
        s.listen(8)
        answer("bound")
        ask()  # hold the name until told


@pytest.mark.parametrize(
    "who",
    [pytest.param("another-uid", marks=needs_root), "same-uid-another-pid", "warnings-as-errors"],
)
def test_squatter_on_the_name(who):
    """Decision: offer still succeeds (keys recorded, pidfd route unaffected), warns once
    naming the holder (even where warnings are errors, the offer stands), and binds at a
    later offer once the name is free; fetch refuses the squatter by SO_PEERCRED, naming it."""
    with Child(exporter) as exp:
        info = exp.read()
        name = fs.socket_name(UID, exp.pid, info["start"])
        if who == "another-uid":
            sq = Child(squatter, name, NOBODY)
            sq_pid, sq_uid = sq.pid, NOBODY
        else:
            sq = Child(squatter, name)
            sq_pid, sq_uid = sq.pid, UID
        try:
            assert sq.read() == "bound"
            if who == "warnings-as-errors":
                assert exp.ask("offer", key(1), "666", 0, "strict") == {"warnings": []}
            else:
                got = exp.ask("offer", key(1), "666", 0)
                assert len(got["warnings"]) == 1
                assert f"pid {sq_pid} uid {sq_uid}" in got["warnings"][0]
            assert exp.ask("pending", key(1)) is True
            detail = refused(fs.fetch, exp.pid, info["start"], UID, key(1), timeout=10)
            assert f"held by pid {sq_pid} uid {sq_uid}" in detail and "squatter" in detail
        finally:
            assert sq.close() == 0  # EOF on its command pipe: it exits and frees the name
        # The name is free: the next offer binds it, quietly.
        assert exp.ask("offer", key(2), "600", 0) == {"warnings": []}
        os.close(fs.fetch(exp.pid, info["start"], UID, key(1), timeout=10))
        exp.ask("withdraw_all")


_REPLY = struct.Struct("<BHI")
HOSTILE = ["stall", "two", "pipe", "garbage", "nofd", "close", "huge", "refusal+fd", "ok+2msgs"]


def hostile_server(ask, answer) -> None:
    pid, start, _ = own_process()
    fd = memfd()
    r, w = os.pipe()
    held = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(fs.socket_name(os.geteuid(), pid, start))
        s.listen(8)
        answer({"start": start})
        for mode in HOSTILE:
            conn, _ = s.accept()
            conn.recv(64)
            ok = _REPLY.pack(0, 0o600, 0)
            if mode == "stall":
                held.append(conn)
                continue
            if mode == "two":
                send_fds(conn, [fd, fd], ok)
            elif mode == "pipe":
                send_fds(conn, [r], ok)
            elif mode == "garbage":
                conn.send(b"\xff" * 5)
            elif mode == "nofd":
                conn.send(ok)
            elif mode == "huge":
                conn.send(b"x" * 60000)
            elif mode == "refusal+fd":
                send_fds(conn, [fd], _REPLY.pack(2, 0o600, 0))
            elif mode == "ok+2msgs":
                conn.send(b"\0")
                send_fds(conn, [fd], ok)
            conn.close()
        ask()
        answer("bye")


def test_hostile_server_cannot_hang_or_fool_fetch():
    with Child(hostile_server) as srv:
        start = srv.read()["start"]
        before = fd_count()
        for mode in HOSTILE:
            t0 = time.monotonic()
            detail = refused(fs.fetch, srv.pid, start, UID, key(1), timeout=1.0)
            assert time.monotonic() - t0 < 8, mode
            assert fd_count() == before, f"{mode} leaked a descriptor"
            expected = {
                "stall": "did not answer within 1.0 s",
                "close": "closed without answering",
                "pipe": "not a memfd",
                "refusal+fd": "HIPIPC_SHARE",
            }
            assert expected.get(mode, "malformed") in detail, (mode, detail)
        srv.ask("quit")


# -- hostile clients -----------------------------------------------------------------------


def _connect(name: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(name)
    return s


def _settled(pid: int, target: int, timeout: float = 15.0) -> int:
    end = time.monotonic() + timeout
    while (n := fd_count(pid)) != target and time.monotonic() < end:
        time.sleep(0.02)
    return n


def test_hostile_clients_cannot_hang_leak_or_crash_the_server():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    with Child(exporter) as exp:
        info = exp.read()
        exp.ask("offer", key(1), "600", 0)
        name = fs.socket_name(UID, exp.pid, info["start"])
        base = fd_count(exp.pid)

        def fetch_ok() -> float:
            t0 = time.monotonic()
            os.close(fs.fetch(exp.pid, info["start"], UID, key(1), timeout=10))
            return time.monotonic() - t0

        silent = _connect(name)  # connects and sends nothing
        assert fetch_ok() < 5
        for junk in (
            b"nonsense",
            b"hfd1" + b"A" * 40,
            b"hfd1" + key(1).encode() + b"x",
            b"y" * 65000,
        ):
            with _connect(name) as c:
                c.send(junk)
                assert c.recv(64)[0] == 3  # refused as malformed
        r, w = os.pipe()
        with _connect(name) as c:  # descriptors sent to the server are never installed there
            send_fds(c, [r, w, r, w], b"hfd1" + key(1).encode())
            data, _anc, _flags, _ = c.recvmsg(64, socket.CMSG_SPACE(4 * 8))
            for _level, _kind, blob in _anc:
                for fd in struct.unpack(f"{len(blob) // 4}i", blob):
                    os.close(fd)
            assert data[0] == 0
        os.close(r)
        os.close(w)
        for _ in range(200):  # disconnect mid-reply
            with _connect(name) as c:
                c.send(b"hfd1" + key(1).encode())
        flood = [_connect(name) for _ in range(1000)]
        try:
            assert fetch_ok() < 8
            time.sleep(0.3)  # let the server accept what it will
            assert fd_count(exp.pid) <= base + fs._MAX_CLIENTS + 1
        finally:
            for c in flood:
                c.close()
            silent.close()
        assert _settled(exp.pid, base) == base
        assert fetch_ok() < 5
        exp.ask("withdraw_all")


def test_a_silent_client_is_dropped_at_its_deadline():
    with Child(exporter) as exp:
        info = exp.read()
        exp.ask("client_seconds", 0.3)
        exp.ask("offer", key(1), "600", 0)
        t0 = time.monotonic()
        with _connect(fs.socket_name(UID, exp.pid, info["start"])) as silent:
            assert silent.recv(64) == b""  # closed by the server (the socket's timeout: 10 s)
        assert 0.25 < time.monotonic() - t0 < 8
        exp.ask("withdraw_all")


def test_server_at_the_fd_limit_keeps_serving():
    """A flood at the exporter's descriptor limit: the server gives up the oldest waiting
    client's descriptor, never one it has not read yet, so a real request still gets in."""
    with Child(exporter) as exp:
        info = exp.read()
        exp.ask("offer", key(1), "600", 0)
        exp.ask("limit", 6)
        name = fs.socket_name(UID, exp.pid, info["start"])
        got: list = []

        def fetch() -> None:
            try:
                got.append(fs.fetch(exp.pid, info["start"], UID, key(1), timeout=20))
            except BaseException as exc:
                got.append(exc)

        # Stopped, the server accepts nothing: flood connections and real requests queue up
        # in its backlog, so each request is accepted in a batch among flood connections (at
        # several places in the batch: which ones a careless server drops depends on that).
        threads: list[threading.Thread] = []
        flood: list[socket.socket] = []
        os.kill(exp.pid, signal.SIGSTOP)
        try:
            flood += [_connect(name) for _ in range(50)]
            for _ in range(4):
                threads.append(threading.Thread(target=fetch))
                threads[-1].start()
                time.sleep(0.1)
                flood += [_connect(name) for _ in range(4)]
            flood += [_connect(name) for _ in range(100)]
        finally:
            os.kill(exp.pid, signal.SIGCONT)
        try:
            for thread in threads:
                thread.join(30)
            assert len(got) == 4 and all(isinstance(fd, int) for fd in got), got
        finally:
            for item in got:
                if isinstance(item, int):
                    os.close(item)
            for c in flood:
                c.close()
        os.close(fs.fetch(exp.pid, info["start"], UID, key(1), timeout=10))
        exp.ask("withdraw_all")


def test_concurrent_fetches_offers_and_withdrawals():
    with Child(exporter) as exp:
        info = exp.read()
        exp.ask("offer", key(1), "600", 0)
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                for _ in range(100):
                    os.close(fs.fetch(exp.pid, info["start"], UID, key(1), timeout=20))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for i in range(30):  # meanwhile the exporter offers and withdraws other keys
            exp.ask("offer", key(100 + i), "600", i % 2)
            exp.ask("withdraw", key(100 + i - 1))
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        exp.ask("withdraw_all")


def test_no_descriptor_leaks_over_1000_fetches():
    with Child(exporter) as exp:
        info = exp.read()
        exp.ask("offer", key(1), "600", 0)
        theirs = fd_count(exp.pid)  # no client connected yet
        os.close(fs.fetch(exp.pid, info["start"], UID, key(1), timeout=10))
        mine = fd_count()
        for _ in range(1000):
            fd = fs.fetch(exp.pid, info["start"], UID, key(1), timeout=10)
            os.close(fd)
        assert fd_count() == mine
        assert _settled(exp.pid, theirs) == theirs
        exp.ask("withdraw_all")


# -- fork and the fd limit -----------------------------------------------------------------


def test_fork_child_starts_empty_and_leaves_the_parent_serving():
    fd = memfd()
    pid, start, _ = own_process()
    try:
        fs.offer(key(1), fd, 0o600)
        fs.offer(key(9), fd, 0o600, once=True)  # the server's own reference: a dup
        listener = f"socket:[{os.fstat(fs._state.server.listener.fileno()).st_ino}]"
        ino = os.fstat(fd).st_ino

        def child():
            pend = fs.pending(key(1))
            links, refs = [], 0
            for n in os.listdir("/proc/self/fd"):
                try:
                    links.append(os.readlink(f"/proc/self/fd/{n}"))
                    refs += os.stat(f"/proc/self/fd/{n}").st_ino == ino
                except OSError:
                    pass
            got = fs.fetch(pid, start, UID, key(1), timeout=10)  # the parent still serves
            os.close(got)
            fs.offer(key(2), fd, 0o600)  # the child's own server, under its own name
            mine = own_process()
            own = fs.fetch(mine[0], mine[1], UID, key(2), timeout=10)
            os.close(own)
            fs.withdraw_all()
            return [pend, listener in links, refs]

        assert in_fork(child) == [False, False, 1]  # only the test's own fd, not the dup
        assert fs.pending(key(9))
        assert fs.pending(key(1))
        os.close(fs.fetch(pid, start, UID, key(1)))
        assert not fs.pending(key(2))
    finally:
        os.close(fd)


@pytest.mark.parametrize("hard_room", [False, True])
def test_fd_limit(hard_room):
    def child():
        fd = memfd()
        n = fd_count() + 8
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard if hard_room else n))
        filler = []
        try:
            for _ in range(n):
                filler.append(os.dup(0))
        except OSError:
            pass
        try:
            fs.offer(key(1), fd, 0o600)
        except HipError as exc:
            return [int(exc.code), str(exc)]
        got = fs.fetch(*own_process()[:2], UID, key(1), timeout=10)
        os.close(got)
        fs.withdraw_all()
        return [0, resource.getrlimit(resource.RLIMIT_NOFILE)[0] > n]

    code, detail = in_fork(child)
    if hard_room:
        assert (code, detail) == (0, True)  # the soft limit went up
    else:
        assert code == hipError_t.hipErrorOutOfMemory and "RLIMIT_NOFILE" in detail, detail


@pytest.mark.parametrize("hard_room", [False, True])
def test_fetch_at_the_fd_limit(hard_room):
    """One free descriptor (taken by the socket): fetch raises the soft limit before it asks,
    or fails with hipErrorOutOfMemory naming the limit; the once-key is not lost then."""
    fd = memfd()
    pid, start, _ = own_process()
    try:
        fs.offer(key(1), fd, 0o600, once=True)

        def child():
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            n = fd_count() + 8
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard if hard_room else n))
            filler = []
            try:
                for _ in range(n):
                    filler.append(os.dup(0))
            except OSError:
                pass
            os.close(filler.pop())  # exactly one left: the socket's
            try:
                got = fs.fetch(pid, start, UID, key(1), timeout=10)
            except HipError as exc:
                return [int(exc.code), str(exc)]
            return [0, os.fstat(got).st_ino == os.fstat(fd).st_ino]

        code, detail = in_fork(child)
        if hard_room:
            assert (code, detail) == (0, True)
            assert not fs.pending(key(1))
        else:
            assert code == hipError_t.hipErrorOutOfMemory and "RLIMIT_NOFILE" in detail, detail
            assert fs.pending(key(1))  # never sent: the ticket is still there
    finally:
        os.close(fd)
