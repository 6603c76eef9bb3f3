"""Issue 10, the store's part: hostile headers (item 7), who removes a store at exit (8), a
store pre-created by another user (9), a store removed under a running process and inode
exhaustion (11), pathological HIPIPC_STORE paths (12), and the review's messages.

Everything runs on real segments in real stores; foreign-uid cases fork a child and drop to
uid 65534 (they need root and skip otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import uuid

import pytest
from _proc import child_env, in_fork, run_json, run_python, store_path

import hipipc as hip
from hipipc.handle import HandleKind
from hipipc.store import _EXPORTER, _IDENTITY, HandleStore

E = hip.hipError_t
NOBODY = 65534
PID_AT = _IDENTITY.size
PIDNS_AT = PID_AT + 4
START_AT = PID_AT + 8
CREATED_AT = PID_AT + 16
assert _EXPORTER.format == "<IIQd"
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="switching a child to another uid needs root"
)


def become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hipipc", *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.fixture
def temp_store():
    """A store of its own, with its template; this process publishes in it directly."""
    template = f"/dev/shm/hipipc-hard-{uuid.uuid4().hex[:10]}-{{uid}}"
    store = HandleStore(template)
    yield store
    store.close()
    path = store.own_path()
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, 0o700)
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def publish(store: HandleStore, mode: int = 0o600) -> tuple[str, int]:
    handle = hip.IpcMemHandle.new(HandleKind.HOST_MEMORY, 4096, 0, os.geteuid())
    fd = store.create(handle, 4096)
    store.publish(fd, handle, mode)
    return handle.segment_name, fd


# -- item 7: every header field is hostile ---------------------------------------------

HOSTILE = [
    ("pid_ffffffff", PID_AT, struct.pack("<I", 0xFFFFFFFF), "not a process id"),
    ("pid_2_31", PID_AT, struct.pack("<I", 1 << 31), "not a process id"),
    ("pid_0", PID_AT, struct.pack("<I", 0), "not a process id"),
    ("start_2_64", START_AT, struct.pack("<Q", (1 << 64) - 1), "start time"),
    ("created_nan", CREATED_AT, struct.pack("<d", float("nan")), "creation time"),
    ("created_inf", CREATED_AT, struct.pack("<d", float("inf")), "creation time"),
    ("created_neg", CREATED_AT, struct.pack("<d", -5.0), "creation time"),
    ("created_huge", CREATED_AT, struct.pack("<d", 1e300), "creation time"),
]

SWEEP_AND_LIST = """
import json, subprocess, sys
import hipipc as hip
ptr = hip.hipMalloc(64)
hip.hipIpcGetMemHandle(ptr)  # the first export sweeps the store
hip.hipFree(ptr)
runs = [subprocess.run([sys.executable, "-m", "hipipc", *cmd], capture_output=True, text=True,
                       timeout=30) for cmd in (["gc"], ["ls"], ["ls", "--json"], ["info"])]
print(json.dumps([[r.returncode, r.stdout, r.stderr] for r in runs]))
"""


@pytest.mark.parametrize("field,offset,value,reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_header_is_skipped_with_a_warning_never_raised_or_unlinked(
    temp_store, field, offset, value, reason
):
    name, fd = publish(temp_store, 0o666)  # HIPIPC_SHARE=all: a grantee may write it
    try:
        os.pwrite(fd, value, offset)
        skipped: list = []
        assert temp_store.collect(skipped) == []
        assert [n for n, _ in skipped] == [name] and reason in skipped[0][1]
        got = run_json(SWEEP_AND_LIST, env=child_env(HIPIPC_STORE=temp_store.template))
        (gc_rc, gc_out, gc_err), (ls_rc, ls_out, ls_err), (js_rc, js_out, _), (in_rc, *_) = got
        assert gc_rc == ls_rc == js_rc == in_rc == 0, got
        assert "Traceback" not in gc_err + ls_err
        for err in (gc_err, ls_err):
            lines = err.strip().splitlines()
            assert len(lines) == 1 and f"skipped segment {name[:12]}" in lines[0], err
            assert reason in lines[0]
        assert "removed 0" in gc_out
        assert json.loads(js_out)["segments"] == []  # nothing listed from that header
        assert name in os.listdir(temp_store.own_path())  # never unlinked
    finally:
        os.close(fd)


def test_a_grantee_cannot_get_a_live_shared_export_swept_by_forging_a_dead_pid():
    # The exporter (this process) maps its export; a grantee with write access writes a pid
    # that is not running into the header.  The owner's gc must not believe it.
    ptr = hip.hipMalloc(4096)
    try:
        handle = hip.hipIpcGetMemHandle(ptr, share="all")
        segment = os.path.join(store_path(), handle.segment_name)
        with open("/proc/sys/kernel/pid_max") as f:
            dead_pid = int(f.read()) + 1  # in range, but no process can have it
        fd = os.open(segment, os.O_RDWR)
        try:
            os.pwrite(fd, struct.pack("<I", dead_pid), PID_AT)
        finally:
            os.close(fd)
        assert HandleStore().collect() == []
        assert handle.segment_name in os.listdir(store_path())
        assert (
            run_json(f"""
import json, hipipc as hip
p = hip.hipIpcOpenMemHandle(bytes.fromhex("{bytes(handle).hex()}"))
hip.hipIpcCloseMemHandle(p)
print(json.dumps("opened"))
""")
            == "opened"
        )  # still exported: its importers are not cut off
    finally:
        hip.hipFree(ptr)


def test_a_shared_segment_of_a_really_dead_exporter_is_still_collected(temp_store):
    # Nobody maps it and its exporter is gone: the writable-header rule must not keep
    # orphans forever.
    name, fd = publish(temp_store, 0o666)
    with open("/proc/sys/kernel/pid_max") as f:
        os.pwrite(fd, struct.pack("<I", int(f.read()) + 1), PID_AT)
    os.close(fd)
    assert temp_store.collect() == [name]


# -- item 8: who removes a store at exit -----------------------------------------------

EXPORT_FREE_EXIT = """
import hipipc as hip
p = hip.hipMalloc(64)
hip.hipIpcGetMemHandle(p)
hip.hipFree(p)
"""


@needs_root
def test_an_admin_provisioned_sticky_store_survives_its_users_exits():
    # Root provisions a shared store (root-owned, sticky, 1733) at a fixed path.  A process
    # that exported into it and exits with it empty must leave it: the next user would
    # recreate it as a private store and lock everyone else out.
    path = f"/dev/shm/hipipc-admin-{uuid.uuid4().hex[:10]}"
    os.mkdir(path)
    os.chmod(path, 0o1733)
    try:
        proc = run_python(EXPORT_FREE_EXIT, env=child_env(HIPIPC_STORE=path))
        assert proc.returncode == 0, proc.stderr
        st = os.lstat(path)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o1733
    finally:
        os.rmdir(path)


def test_a_store_another_process_created_is_not_removed_by_a_user_of_it():
    path = f"/dev/shm/hipipc-other-{uuid.uuid4().hex[:10]}"
    os.mkdir(path)
    os.chmod(path, 0o711)  # made by some other process of this user
    try:
        proc = run_python(EXPORT_FREE_EXIT, env=child_env(HIPIPC_STORE=path))
        assert proc.returncode == 0, proc.stderr
        assert os.path.isdir(path)
    finally:
        os.rmdir(path)
    # The process that creates a store still removes it when it leaves it empty.
    proc = run_python(EXPORT_FREE_EXIT, env=child_env(HIPIPC_STORE=path))
    assert proc.returncode == 0, proc.stderr
    assert not os.path.lexists(path)


# -- item 9: a store pre-created by another user ---------------------------------------

MALLOC = """
import json, hipipc as hip
try:
    hip.hipFree(hip.hipMalloc(64))
    print(json.dumps(["ok", ""]))
except hip.HipError as exc:
    print(json.dumps([exc.code.name, exc.detail]))
"""


@needs_root
def test_a_store_squatted_by_another_user_is_refused_with_the_way_out():
    template = f"/dev/shm/hipipc-squat-{uuid.uuid4().hex[:10]}-{{uid}}"
    path = template.replace("{uid}", str(os.geteuid()))
    os.mkdir(path, 0o700)
    os.chown(path, NOBODY, NOBODY)  # another user made our store first
    env = child_env(HIPIPC_STORE=template)
    try:
        code, detail = run_json(MALLOC, env=env)
        assert code == "hipErrorOperatingSystem"
        assert f"refusing handle store {path}: owned by uid {NOBODY}" in detail
        assert f"only uid {NOBODY} or root can remove it" in detail
        assert "HIPIPC_STORE=/dev/shm/hipipc-{uid}-" in detail  # the way out, concretely
        info = cli("info", env=env)
        assert info.returncode == 1
        assert "UNUSABLE" in info.stdout and f"owned by uid {NOBODY}" in info.stderr
        js = cli("info", "--json", env=env)
        assert js.returncode == 1 and f"uid {NOBODY}" in json.loads(js.stdout)["store_problem"]
        # The way out works.
        code, _ = run_json(MALLOC, env=child_env(HIPIPC_STORE=template + "-mine"))
        assert code == "ok"
    finally:
        os.rmdir(path)


# -- item 11: a store removed under a running exporter; inode exhaustion ---------------

REMOVER = """
import json, os, sys, threading, time
import hipipc as hip
from hipipc.store import HandleStore

path = HandleStore().own_path()
stop = threading.Event()
removed = 0

def remove():
    global removed
    while not stop.is_set():
        try:
            os.rmdir(path)  # what another process's exit cleanup does to an empty store
            removed += 1
        except OSError:
            pass
        time.sleep(0.0005)

t = threading.Thread(target=remove)
t.start()
errors = {}
try:
    for i in range(1500):
        try:
            p = hip.hipMalloc(64)
            hip.hipIpcGetMemHandle(p)
            hip.hipFree(p)
            if i % 10 == 0:
                ev = hip.hipEventCreateWithFlags(hip.hipEventInterprocess
                                                 | hip.hipEventDisableTiming)
                hip.hipIpcGetEventHandle(ev)
                hip.hipEventDestroy(ev)
        except Exception as exc:
            key = type(exc).__name__ + ": " + str(exc)[:80]
            errors[key] = errors.get(key, 0) + 1
finally:
    stop.set()
    t.join()
print(json.dumps({"errors": errors, "removed": removed}))
"""


def test_exports_survive_the_store_being_removed_again_and_again():
    template = f"/dev/shm/hipipc-churn-{uuid.uuid4().hex[:10]}-{{uid}}"
    try:
        got = run_json(REMOVER, env=child_env(HIPIPC_STORE=template), timeout=300)
    finally:
        shutil.rmtree(template.replace("{uid}", str(os.geteuid())), ignore_errors=True)
    assert got["removed"] > 10  # the race was really run
    assert got["errors"] == {}


INODES = """
import json, os, sys
import hipipc as hip
out = {}
ptrs = []
try:
    for _ in range(64):
        ptrs.append(hip.hipMalloc(4096))
    out["error"] = None
except hip.HipError as exc:
    out["error"] = [exc.code.name, exc.detail]
except Exception as exc:
    out["error"] = [type(exc).__name__, str(exc)]
out["allocated"] = len(ptrs)
for p in ptrs:
    hip.hipFree(p)
print(json.dumps(out))
"""


def _in_small_tmpfs(options: str, code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    mnt = tempfile.mkdtemp(prefix="hipipc-inodes-")
    try:
        probe = subprocess.run(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                f'mount -t tmpfs -o {options} tmpfs "$1" && umount "$1"',
                "sh",
                mnt,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if probe.returncode != 0:
            pytest.skip(
                f"cannot mount a private tmpfs here (unshare -m + mount): {probe.stderr.strip()}"
            )
        env = dict(env, HIPIPC_STORE=os.path.join(mnt, "store-{uid}"))
        return subprocess.run(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                f'mount -t tmpfs -o {options} tmpfs "$1" && exec "$2" -c "$3" "$1"',
                "sh",
                mnt,
                sys.executable,
                textwrap.dedent(code),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    finally:
        os.rmdir(mnt)


def test_running_out_of_inodes_is_out_of_memory_naming_inodes():
    # 8 inodes, plenty of bytes: the root, the store, then segments until none is left.
    proc = _in_small_tmpfs("size=16m,nr_inodes=8", INODES, child_env())
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    got = json.loads(proc.stdout.splitlines()[-1])
    assert 0 < got["allocated"] < 64
    code, detail = got["error"]
    assert code == "hipErrorOutOfMemory", got
    assert "inodes" in detail and "nr_inodes" in detail


# -- item 12: pathological HIPIPC_STORE paths ------------------------------------------


def _bad_store_file(tmp: str) -> tuple[str, str]:
    path = os.path.join(tmp, "file")
    open(path, "w").close()
    return path, "not a directory"


def _bad_store_under_file(tmp: str) -> tuple[str, str]:
    open(os.path.join(tmp, "file"), "w").close()
    return os.path.join(tmp, "file", "store"), "not a directory"


def _bad_store_missing_parent(tmp: str) -> tuple[str, str]:
    return os.path.join(tmp, "missing", "store"), "does not exist"


def _bad_store_symlink(tmp: str) -> tuple[str, str]:
    os.mkdir(os.path.join(tmp, "real"), 0o711)
    os.symlink(os.path.join(tmp, "real"), os.path.join(tmp, "link"))
    return os.path.join(tmp, "link"), "a symbolic link"


BAD_STORES = [_bad_store_file, _bad_store_under_file, _bad_store_missing_parent, _bad_store_symlink]


@pytest.mark.parametrize("make", BAD_STORES, ids=lambda f: f.__name__.removeprefix("_bad_"))
def test_a_pathological_store_path_is_a_clear_error_everywhere(tmp_path, make):
    path, reason = make(str(tmp_path))
    env = child_env(HIPIPC_STORE=path)
    code, detail = run_json(MALLOC, env=env)
    assert code == "hipErrorOperatingSystem" and path in detail and reason in detail
    assert "HIPIPC_STORE" in detail
    for cmd in ("info", "ls", "gc"):
        proc = cli(cmd, env=env)
        assert proc.returncode == 1, (cmd, proc.stdout, proc.stderr)
        assert path in proc.stderr and reason in proc.stderr and "HIPIPC_STORE" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert "not created yet" not in proc.stdout and "removed 0" not in proc.stdout


def _malloc_in_unwritable_parent(parent: str) -> list:
    become(NOBODY, NOBODY)
    os.environ["HIPIPC_STORE"] = os.path.join(parent, "store-{uid}")
    try:
        hip.hipFree(hip.hipMalloc(64))
        return ["ok", ""]
    except hip.HipError as exc:
        return [exc.code.name, exc.detail]
    except Exception as exc:
        return [type(exc).__name__, str(exc)]


@needs_root
def test_a_store_in_an_unwritable_parent_is_a_clear_error():
    parent = f"/dev/shm/hipipc-ro-{uuid.uuid4().hex[:10]}"
    os.mkdir(parent)
    os.chmod(parent, 0o755)  # root's: others may search it, not write it
    try:
        code, detail = in_fork(_malloc_in_unwritable_parent, parent)
    finally:
        os.rmdir(parent)
    assert code == "hipErrorOperatingSystem", detail
    assert f"cannot create handle store {parent}/store-{NOBODY}" in detail
    assert f"uid {NOBODY} must be able to write {parent}" in detail and "HIPIPC_STORE" in detail


# -- the review's messages -------------------------------------------------------------


def _open_as(raw: bytes, uid: int, gid: int) -> list:
    become(uid, gid)
    try:
        hip.hipIpcCloseMemHandle(hip.hipIpcOpenMemHandle(raw))
        return ["ok", ""]
    except hip.HipError as exc:
        return [exc.code.name, exc.detail]


@needs_root
def test_a_group_shared_segment_refused_to_an_outsider_does_not_advise_opting_in():
    ptr = hip.hipMalloc(4096)
    try:
        handle = hip.hipIpcGetMemHandle(ptr, share="group")
        group = os.stat(os.path.join(store_path(), handle.segment_name)).st_gid
        outsider = NOBODY if group != NOBODY else NOBODY - 1
        code, detail = in_fork(_open_as, bytes(handle), NOBODY, outsider)
        assert code == "hipErrorInvalidHandle"
        assert f"shared with group {group} only" in detail and f"uid {NOBODY}" in detail
        assert "HIPIPC_SHARE" not in detail and "opt in" not in detail
    finally:
        hip.hipFree(ptr)


def test_a_symlink_planted_under_a_segment_name_is_a_bad_segment_not_a_bad_store(temp_store):
    name, fd = publish(temp_store)
    os.close(fd)
    handle_path = os.path.join(temp_store.own_path(), name)
    os.rename(handle_path, handle_path + ".real")
    os.symlink(handle_path + ".real", handle_path)
    try:
        handle = hip.IpcMemHandle.new(HandleKind.HOST_MEMORY, 4096, 0, os.geteuid())
        # Open the planted name through the store directly (the handle's digest differs, so
        # rename the link to this handle's name).
        os.rename(handle_path, os.path.join(temp_store.own_path(), handle.segment_name))
        with pytest.raises(hip.HipError) as info:
            temp_store.open(handle)
        assert info.value.code == E.hipErrorInvalidResourceHandle
        assert "symbolic link, not a segment" in info.value.detail
        assert "refusing handle store" not in info.value.detail
    finally:
        for n in os.listdir(temp_store.own_path()):
            os.unlink(os.path.join(temp_store.own_path(), n))
