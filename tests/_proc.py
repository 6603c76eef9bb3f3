"""Process helpers for the core tests: real processes, every wait bounded, children killed.

Not a test module (pytest collects ``test_*.py`` only); the core test files import it.  Why a
helper module: nearly every core rule involves a second process (an importer is never the
exporter), and the bounded-wait/kill-on-failure plumbing must not be re-typed, and got wrong,
in every test.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from hipipc.store import HandleStore

ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra: str | None) -> dict[str, str]:
    """The environment of a spawned interpreter: ours (HIPIPC_STORE included), plus ``extra``.

    A value of None removes the variable.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_python(
    code: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    input: bytes | None = None,
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (not a fork); killed if it outlives ``timeout``."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        timeout=timeout,
        env=env or child_env(),
        input=input,
    )


def run_json(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """Run ``code`` (which prints one JSON line last) and return it; fails on a bad exit."""
    proc = run_python(code, *args, env=env, timeout=timeout)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"child exited {proc.returncode}\n{out}\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def readline(stream, timeout: float, what: str = "child") -> str:
    """One line from ``stream`` or AssertionError after ``timeout`` seconds."""
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not got:
        raise AssertionError(f"{what} printed nothing in {timeout} s")
    return got[0].decode()


def wait_pid(pid: int, timeout: float = 30.0) -> int:
    """Exit code of a forked child (negative: killed by that signal); kill it past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish in {timeout} s")
        time.sleep(0.005)


def in_fork(fn, *args, timeout: float = 30.0) -> Any:
    """Run ``fn(*args)`` in a forked child and return its JSON-able result.

    The child reports through a pipe and leaves with ``os._exit`` (no pytest teardown, no
    atexit handlers in the copy of this process).  An exception in the child is re-raised
    here as AssertionError with its repr.  Used where a spawned interpreter cannot run: after
    the child drops to another uid it may not be able to exec a Python under /root.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 70
        try:
            os.close(rfd)
            try:
                reply = {"ok": fn(*args)}
            except BaseException as exc:
                reply = {"error": repr(exc)}
            os.write(wfd, json.dumps(reply).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                raise AssertionError(f"forked child {pid} did not answer in {timeout} s")
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    except BaseException:
        os.kill(pid, 9)
        raise
    finally:
        os.close(rfd)
        code = wait_pid(pid, timeout)
    assert code == 0, f"forked child exited {code}"
    reply = json.loads(b"".join(chunks))
    if "error" in reply:
        raise AssertionError(f"forked child raised {reply['error']}")
    return reply["ok"]


EXPORTER = """
import hashlib, os, sys
import hipipc as hip

sizes = [int(s) for s in sys.argv[1].split(",")]
share = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
ptrs = {}
for i, size in enumerate(sizes):
    ptr = hip.hipMalloc(size)
    hip.hipMemcpy(ptr, bytes((i * 7 + k) % 251 for k in range(size)), size,
                  hip.hipMemcpyHostToDevice)
    ptrs[i] = (ptr, size)
    print(bytes(hip.hipIpcGetMemHandle(ptr, share=share)).hex(), flush=True)
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "sum":
        ptr, size = ptrs[int(arg[0])]
        data = bytearray(size)
        hip.hipMemcpy(data, ptr, size, hip.hipMemcpyDeviceToHost)
        print(hashlib.sha256(data).hexdigest(), flush=True)
    elif cmd == "free":
        hip.hipFree(ptrs.pop(int(arg[0]))[0])
        print("freed", flush=True)
    elif cmd == "quit":
        break
for ptr, _ in ptrs.values():
    hip.hipFree(ptr)
print("bye", flush=True)
"""


def pattern(index: int, size: int) -> bytes:
    """The bytes the exporter script fills buffer ``index`` with."""
    return bytes((index * 7 + k) % 251 for k in range(size))


class Exporter:
    """A spawned interpreter that allocates, fills and exports buffers of ``sizes`` bytes.

    ``handles`` are their 64-byte handles.  ``command("sum 0")`` asks for the SHA-256 of a
    buffer (to check an importer's writes), ``command("free 0")`` frees one (revocation).
    Leaving the ``with`` block ends it: ``quit`` and a checked exit code normally, SIGKILL when
    the block raised.
    """

    def __init__(
        self,
        sizes: list[int],
        share: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.sizes = sizes
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(EXPORTER),
                ",".join(map(str, sizes)),
                share or "",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env or child_env(),
        )
        try:
            self.handles = [bytes.fromhex(self._line()) for _ in sizes]
            ready, pid = self._line().split()
            assert ready == "ready" and int(pid) == self.proc.pid
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self) -> str:
        line = readline(self.proc.stdout, self.timeout, "exporter").strip()
        if not line:
            raise AssertionError(f"exporter ended early (exit code {self.proc.poll()})")
        return line

    def command(self, line: str) -> str:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._line()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(self.timeout)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def finish(self) -> None:
        """Ask the exporter to free everything and exit; check that it did."""
        assert self.command("quit") == "bye"
        code = self.proc.wait(self.timeout)
        self._close_pipes()
        assert code == 0, f"exporter exited {code}"

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.proc.poll() is None:
            self.finish()
        else:
            self.kill()


def store_path() -> str:
    """This uid's store directory under the run's HIPIPC_STORE."""
    return HandleStore().own_path()


def store_names() -> set[str]:
    path = store_path()
    return set(os.listdir(path)) if os.path.isdir(path) else set()
