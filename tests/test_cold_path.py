"""The cold path (issue 15): what a process prepares at import so that its first open is fast,
and the rules that preparation must keep.

The registry is built at import (with no exit hook) and adopted by the first call only where
nothing it was built from changed: the environment that picks the store and the backend, and
the process (not a forked child).  Timing lives in the benchmarks (bench_ipc's cold rows).
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest
from _proc import child_env, run_json, store_names

import hipipc as hip


@pytest.fixture
def alloc():
    """``alloc(n)``: a pointer freed after the test."""
    ptrs: list[int] = []

    def make(nbytes: int) -> int:
        ptrs.append(hip.hipMalloc(nbytes))
        return ptrs[-1]

    yield make
    for ptr in ptrs:
        hip.hipFree(ptr)


ADOPTS = """
import json, os, sys
import numpy as np
import hipipc as hip
from hipipc import registry
spare = registry._spare[1]
ptr = hip.hipIpcOpenMemHandle(bytes.fromhex(sys.argv[1]))
arr = hip.asarray(ptr, 4096)
out = {"adopted": registry.get_registry() is spare, "read": int(arr[0]),
       "base": type(hip.arrays._pin_of(arr)).__name__}
arr[1] = 7
hip.hipIpcCloseMemHandle(ptr)
out["after_close"] = int(arr[0])  # the view keeps the mapping
own = hip.hipMalloc(4096)
hip.hipIpcGetMemHandle(own)  # left for the exit rule to revoke
out["names"] = len(os.listdir(registry.get_registry().backend.store.own_path()))
print(json.dumps(out))
"""


def test_a_fresh_process_adopts_the_registry_built_at_import_and_its_exit_rule_runs(alloc):
    ptr = alloc(4096)
    hip.hipMemset(ptr, 0x42, 4096)
    before = store_names()
    got = run_json(ADOPTS, bytes(hip.hipIpcGetMemHandle(ptr)).hex())
    assert got["adopted"] and got["read"] == 0x42 and got["after_close"] == 0x42
    assert got["base"] == "ArrayView"  # the end of the base chain: no ctypes array type
    assert got["names"] == len(before) + 2  # ours and the child's own export
    assert hip.asarray(ptr, 2)[1] == 7  # the child's write landed in the shared pages
    assert store_names() == before | {hip.hipIpcGetMemHandle(ptr).segment_name}


STORE_SET_AFTER_IMPORT = """
import json, os, sys
import hipipc as hip
from hipipc import registry
os.environ["HIPIPC_STORE"] = sys.argv[1]  # after import, before the first call
ptr = hip.hipMalloc(4096)
name = hip.hipIpcGetMemHandle(ptr).segment_name
store = sys.argv[1].replace("{uid}", str(os.geteuid()))
out = {"in_new_store": name in os.listdir(store), "spare_left": registry._spare is not None}
hip.hipFree(ptr)
print(json.dumps(out))
"""


def test_a_store_chosen_after_import_is_the_one_used():
    template = f"/dev/shm/hipipc-test-late-{uuid.uuid4().hex[:8]}-{{uid}}"
    try:
        got = run_json(STORE_SET_AFTER_IMPORT, template)
        assert got == {"in_new_store": True, "spare_left": False}
    finally:
        shutil.rmtree(template.replace("{uid}", str(os.geteuid())), ignore_errors=True)


def test_a_backend_the_build_lacks_fails_at_the_first_call_not_at_import():
    code = """
    import json
    import hipipc as hip
    from hipipc import registry
    out = {"spare": registry._spare is not None}
    try:
        hip.hipMalloc(16)
    except hip.HipError as exc:
        out["code"] = int(exc.code)
    print(json.dumps(out))
    """
    got = run_json(code, env=child_env(HIPIPC_BACKEND="cupy"))
    assert got == {"spare": False, "code": int(hip.hipError_t.hipErrorNotSupported)}


FORKED_BEFORE_FIRST_USE = """
import json, os, sys
import hipipc as hip
from hipipc import registry
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    reg = registry.get_registry()
    ptr = hip.hipMalloc(4096)
    h = hip.hipIpcGetMemHandle(ptr)
    info = {"spare_dropped": registry._spare is None, "own_pid": reg._pid == os.getpid(),
            "handle": bytes(h).hex()}
    os.write(w, json.dumps(info).encode())
    sys.exit(0)  # a normal exit: the child's exit rule revokes its export
os.close(w)
had_spare = registry._spare is not None
data = b""
while chunk := os.read(r, 4096):
    data += chunk
_, status = os.waitpid(pid, 0)
info = json.loads(data)
spare = registry._spare[1] if had_spare else None
try:
    hip.hipIpcOpenMemHandle(bytes.fromhex(info.pop("handle")))
    info["revoked"] = False
except hip.HipError as exc:
    info["revoked"] = exc.code == hip.hipError_t.hipErrorInvalidResourceHandle
info["status"] = status
info["parent_adopts"] = spare is not None and registry.get_registry() is spare
print(json.dumps(info))
"""


def test_a_child_forked_before_the_first_call_builds_its_own_registry():
    before = store_names()
    got = run_json(FORKED_BEFORE_FIRST_USE)
    assert got == {
        "spare_dropped": True,
        "own_pid": True,
        "revoked": True,
        "status": 0,
        "parent_adopts": True,
    }
    assert store_names() == before
