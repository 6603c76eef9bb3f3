"""Issue 10, item 3: a fork while another thread is inside the API.

The child must start with a fresh registry whatever the other thread was doing: it can import
its parent's handles and use the API, but it can never free (revoke) its parent's memory, and
it never deadlocks on a lock the parent's other thread held at fork time.
"""

from __future__ import annotations

import os
import threading

from _proc import Exporter, store_names, wait_pid

import hipipc as hip

E = hip.hipError_t
FORKS = 300
CHILD_TIMEOUT = 30.0

# Child exit-code bits.
FREED_PARENT = 1  # hipFree of the parent's pointer succeeded: the child owns its memory
WRONG_ERROR = 2  # it failed, but not with hipErrorInvalidValue
API_BROKEN = 4  # a fresh malloc/export/free or an import of the parent's handle failed


def _hammer(stop: threading.Event, foreign: bytes, errors: list[str]) -> None:
    """Allocate, export, free, open and close as fast as possible until ``stop``."""
    while not stop.is_set():
        try:
            ptr = hip.hipMalloc(4096)
            hip.hipIpcGetMemHandle(ptr)
            hip.hipFree(ptr)
            imported = hip.hipIpcOpenMemHandle(foreign)
            hip.hipIpcCloseMemHandle(imported)
            event = hip.hipEventCreateWithFlags(
                hip.hipEventInterprocess | hip.hipEventDisableTiming
            )
            hip.hipIpcGetEventHandle(event)
            hip.hipEventDestroy(event)
        except Exception as exc:  # reported by the test, which then fails
            errors.append(repr(exc))
            return


def _child(parent_ptr: int, parent_handle: bytes, foreign: bytes) -> int:  # pragma: no cover
    code = 0
    try:
        try:
            hip.hipFree(parent_ptr)
            code |= FREED_PARENT
        except hip.HipError as exc:
            if exc.code != E.hipErrorInvalidValue:
                code |= WRONG_ERROR
        ptr = hip.hipMalloc(4096)
        hip.hipIpcGetMemHandle(ptr)
        hip.hipFree(ptr)
        for handle in (parent_handle, foreign):
            hip.hipIpcCloseMemHandle(hip.hipIpcOpenMemHandle(handle))
    except BaseException:
        code |= API_BROKEN
    return code


def _wait(pid: int, timeout: float) -> int | None:
    """The child's exit code, or None if it hung (then it is killed)."""
    try:
        return wait_pid(pid, timeout)
    except AssertionError:  # wait_pid killed it past the timeout
        return None


def test_forking_while_another_thread_uses_the_api_gives_a_fresh_safe_child():
    parent_ptr = hip.hipMalloc(4096)
    parent_handle = hip.hipIpcGetMemHandle(parent_ptr)
    hung = 0
    codes: dict[int, int] = {}
    errors: list[str] = []
    with Exporter([4096]) as other:
        foreign = other.handles[0]
        stop = threading.Event()
        worker = threading.Thread(target=_hammer, args=(stop, foreign, errors), daemon=True)
        worker.start()
        try:
            for _ in range(FORKS):
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child
                    code = 70
                    try:
                        code = _child(parent_ptr, bytes(parent_handle), foreign)
                    finally:
                        os._exit(code)
                code = _wait(pid, CHILD_TIMEOUT)
                if code is None:
                    hung += 1
                elif code:
                    codes[code] = codes.get(code, 0) + 1
        finally:
            stop.set()
            worker.join(30)
    try:
        assert not worker.is_alive()
        assert errors == []
        assert hung == 0, f"{hung} of {FORKS} children hung"
        assert codes == {}, f"children's failures (bit 1: freed the parent's memory): {codes}"
        # The parent's export survived every child.
        assert parent_handle.segment_name in store_names()
    finally:
        hip.hipFree(parent_ptr)
