"""BRIEF section 5: the store cannot be listed, names are one-way, segments are private unless
the exporter opts in, tampered stores are refused by exporters and importers alike, and a
foreign uid is refused (and told why) until the exporter shares.

Foreign-uid tests switch a forked child to uid 65534 (nobody) and need root; they skip
otherwise.  A fork, not a spawned interpreter: one under /root may not be exec-able by nobody.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import uuid

import numpy as np
import pytest
from _proc import Exporter, child_env, in_fork, run_json, store_names, store_path

import hipipc as hip
from hipipc.handle import HandleKind
from hipipc.store import PAGE_SIZE, HandleStore

E = hip.hipError_t
NOBODY = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="switching a child to another uid needs root"
)


@pytest.fixture
def exported():
    """``exported(share=None)`` -> (ptr, handle) of a filled 4 KiB allocation, freed after."""
    ptrs: list[int] = []

    def make(share: str | None = None):
        ptr = hip.hipMalloc(4096)
        ptrs.append(ptr)
        hip.hipMemcpy(ptr, np.arange(4096, dtype=np.uint8), 4096)
        return ptr, hip.hipIpcGetMemHandle(ptr, share=share)

    yield make
    for ptr in ptrs:
        hip.hipFree(ptr)


def segment_mode(handle: hip.IpcMemHandle) -> int:
    return stat.S_IMODE(os.stat(os.path.join(store_path(), handle.segment_name)).st_mode)


# -- the store and its names -----------------------------------------------------------


def test_store_is_0711_and_segments_are_0600_regular_files_by_default(exported, monkeypatch):
    monkeypatch.delenv("HIPIPC_SHARE", raising=False)
    before = store_names()
    private = hip.hipMalloc(4096)
    try:
        # Unexported memory has no name at all.
        assert store_names() == before
    finally:
        hip.hipFree(private)
    _, handle = exported()
    st = os.stat(store_path(), follow_symlinks=False)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o711
    assert st.st_uid == os.geteuid()
    seg = os.lstat(os.path.join(store_path(), handle.segment_name))
    assert stat.S_ISREG(seg.st_mode) and stat.S_IMODE(seg.st_mode) == 0o600
    assert seg.st_uid == os.geteuid()
    assert store_names() - before == {handle.segment_name}


def test_segment_names_maps_and_listings_never_show_handle_bytes(exported):
    handles = [exported()[1] for _ in range(8)]
    names = os.listdir(store_path())
    with open("/proc/self/maps") as f:
        maps = f.read()
    listing = subprocess.run(
        [sys.executable, "-m", "hipipc", "ls", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert listing.returncode == 0, listing.stderr
    texts = names + [maps, listing.stdout]
    for handle in handles:
        raw = bytes(handle)
        assert handle.segment_name in names and len(handle.segment_name) == 40
        secret = raw[8:24]
        for text in texts:
            assert raw.hex() not in text
            # Not even 6 consecutive secret bytes (shorter windows would match the hex
            # addresses in /proc/self/maps by chance now and then).
            for i in range(len(secret) - 5):
                assert secret[i : i + 6].hex() not in text


def test_share_env_sets_the_segment_mode(exported, monkeypatch):
    for value, mode in (("user", 0o600), ("group", 0o660), ("all", 0o666), (" All ", 0o666)):
        monkeypatch.setenv("HIPIPC_SHARE", value)
        assert segment_mode(exported()[1]) == mode, value


def test_share_argument_overrides_the_env(exported, monkeypatch):
    monkeypatch.setenv("HIPIPC_SHARE", "all")
    assert segment_mode(exported("user")[1]) == 0o600
    assert segment_mode(exported("group")[1]) == 0o660
    monkeypatch.delenv("HIPIPC_SHARE")
    assert segment_mode(exported("all")[1]) == 0o666
    assert segment_mode(exported()[1]) == 0o600


def test_share_env_reaches_a_spawned_exporter():
    with Exporter([4096], env=child_env(HIPIPC_SHARE="group")) as exporter:
        name = hip.IpcMemHandle(exporter.handles[0]).segment_name
        st = os.stat(os.path.join(store_path(), name))
        assert stat.S_IMODE(st.st_mode) == 0o660


@pytest.mark.parametrize("share", ["world", "everyone", "", "0666", 5])
def test_an_unknown_share_policy_is_invalid_value_and_exports_nothing(share, monkeypatch):
    monkeypatch.delenv("HIPIPC_SHARE", raising=False)
    ptr = hip.hipMalloc(64)
    try:
        before = store_names()
        with pytest.raises(hip.HipError) as exc:
            hip.hipIpcGetMemHandle(ptr, share=share)
        assert exc.value.code == E.hipErrorInvalidValue and "user, group, all" in str(exc.value)
        if isinstance(share, str) and share:
            monkeypatch.setenv("HIPIPC_SHARE", share)
            with pytest.raises(hip.HipError) as exc:
                hip.hipIpcGetMemHandle(ptr)
            assert exc.value.code == E.hipErrorInvalidValue and "HIPIPC_SHARE" in str(exc.value)
            monkeypatch.delenv("HIPIPC_SHARE")
        assert store_names() == before
        # The allocation is still fine and exports once the policy is valid.
        handle = hip.hipIpcGetMemHandle(ptr)
        assert segment_mode(handle) == 0o600
    finally:
        hip.hipFree(ptr)


# -- tampered stores and segments ------------------------------------------------------

PROBE = """
import json, sys
import hipipc as hip
out = {}
try:
    ptr = hip.hipIpcOpenMemHandle(bytes.fromhex(sys.argv[1]))
except hip.HipError as exc:
    out["import"] = [exc.code.name, str(exc)]
else:
    out["import"] = ["ok", bytes(hip.asarray(ptr, 4)).hex()]
    hip.hipIpcCloseMemHandle(ptr)
try:
    mine = hip.hipMalloc(4096)
except hip.HipError as exc:
    out["export"] = [exc.code.name, str(exc)]
else:
    out["export"] = ["ok", ""]
    hip.hipFree(mine)
print(json.dumps(out))
"""


class TempStore:
    """A store of its own (``HIPIPC_STORE`` template) with one segment published in it.

    This process plays the exporter through :class:`HandleStore` directly; the probe runs
    in a spawned interpreter whose environment names this store.
    """

    def __init__(self) -> None:
        self.template = f"/dev/shm/hipipc-tamper-{uuid.uuid4().hex[:10]}-{{uid}}"
        self.path = self.template.replace("{uid}", str(os.geteuid()))
        self.store = HandleStore(self.template)
        self.handle = hip.IpcMemHandle.new(HandleKind.HOST_MEMORY, 4096, 0, os.geteuid())
        fd = self.store.create(self.handle, 4096)
        try:
            os.pwrite(fd, b"\x07\x08\x09\x0a", PAGE_SIZE)
            self.store.publish(fd, self.handle, 0o600)
        finally:
            os.close(fd)
        self.segment = os.path.join(self.path, self.handle.segment_name)

    def probe(self) -> dict:
        return run_json(PROBE, bytes(self.handle).hex(), env=child_env(HIPIPC_STORE=self.template))

    def remove(self) -> None:
        self.store.close()
        for path in (self.path, self.path + ".real"):
            if os.path.islink(path) or os.path.isfile(path):
                os.unlink(path)
            elif os.path.isdir(path):
                os.chmod(path, 0o700)
                shutil.rmtree(path)


@pytest.fixture
def temp_store():
    store = TempStore()
    try:
        yield store
    finally:
        store.remove()
    assert not os.path.lexists(store.path)


def test_an_intact_temporary_store_serves_both_sides(temp_store):
    # The baseline for the tampering tests below: the same probe succeeds on both sides.
    assert temp_store.probe() == {"import": ["ok", "0708090a"], "export": ["ok", ""]}


def _symlink(s: TempStore) -> str:
    os.rename(s.path, s.path + ".real")
    os.symlink(s.path + ".real", s.path)
    return "a symbolic link"


def _not_a_directory(s: TempStore) -> str:
    os.rename(s.path, s.path + ".real")
    with open(s.path, "w"):
        pass
    return "not a directory"


def _owner(s: TempStore) -> str:
    os.chown(s.path, NOBODY, NOBODY)
    return f"owned by uid {NOBODY}"


def _mode(mode: int):
    def tamper(s: TempStore) -> str:
        os.chmod(s.path, mode)
        return f"mode {mode:04o}"

    tamper.__name__ = f"mode_{mode:04o}"
    return tamper


STORE_TAMPERING = [_symlink, _not_a_directory, pytest.param(_owner, marks=needs_root)] + [
    _mode(m) for m in (0o751, 0o715, 0o731, 0o713, 0o755, 0o777, 0o1777)
]


@pytest.mark.parametrize("tamper", STORE_TAMPERING, ids=lambda f: getattr(f, "__name__", f))
def test_a_tampered_store_is_refused_by_importers_and_exporters(temp_store, tamper):
    reason = tamper(temp_store)
    got = temp_store.probe()
    code, message = got["import"]
    assert code == "hipErrorInvalidHandle", got  # 400, hipErrorInvalidResourceHandle
    assert f"refusing handle store {temp_store.path}: {reason}" in message
    assert "HIPIPC_STORE" in message  # the message names the way out
    code, message = got["export"]
    assert code != "ok" and f"refusing handle store {temp_store.path}: {reason}" in message


@needs_root
@pytest.mark.parametrize("mode", [0o1733, 0o1711])
def test_an_admin_provisioned_sticky_root_store_is_accepted(temp_store, mode):
    os.chmod(temp_store.path, mode)
    assert temp_store.probe() == {"import": ["ok", "0708090a"], "export": ["ok", ""]}


def _plant(store: str) -> list[str]:
    """As another user: leave a FIFO, a directory, a symlink and junk in a shared store."""
    become(NOBODY, NOBODY)
    names = ["fifo", "dir", "link", "junk"]
    os.mkfifo(os.path.join(store, "fifo"), 0o600)
    os.mkdir(os.path.join(store, "dir"), 0o700)
    os.symlink("/etc/passwd", os.path.join(store, "link"))
    with open(os.path.join(store, "junk"), "wb") as f:
        f.write(b"junk" * 100)
    return names


SWEEP = """
import json, subprocess, sys
import hipipc as hip
ptr = hip.hipMalloc(64)
hip.hipIpcGetMemHandle(ptr)  # the first export sweeps the store
hip.hipFree(ptr)
runs = [subprocess.run([sys.executable, "-m", "hipipc", cmd], capture_output=True, text=True,
                       timeout=20) for cmd in ("gc", "ls")]
print(json.dumps([[r.returncode, r.stderr.strip()] for r in runs]))
"""


@needs_root
def test_files_others_plant_in_a_shared_store_cannot_hang_or_break_gc_and_exports(temp_store):
    # An admin-provisioned store (root, sticky, 1733) lets every user create entries in it.
    # A FIFO must not hang the sweep (open for reading blocks until a writer comes), and a
    # directory must not make it raise (pread: EISDIR).
    os.chmod(temp_store.path, 0o1733)
    planted = in_fork(_plant, temp_store.path)
    got = run_json(SWEEP, env=child_env(HIPIPC_STORE=temp_store.template), timeout=60)
    assert got == [[0, ""], [0, ""]]
    assert set(planted) | {temp_store.handle.segment_name} == set(os.listdir(temp_store.path))


def _export_as_nobody(store: str) -> dict:
    """As another user, export through the admin's shared store (a fixed HIPIPC_STORE)."""
    become(NOBODY, NOBODY)
    os.environ["HIPIPC_STORE"] = store  # read when this forked child's registry is made
    out = {}
    ptr = hip.hipMalloc(64)
    try:
        handle = hip.hipIpcGetMemHandle(ptr)  # the first export also sweeps the store
        seg = os.stat(os.path.join(store, handle.segment_name))
        out["segment"] = [seg.st_uid, oct(stat.S_IMODE(seg.st_mode))]
    finally:
        hip.hipFree(ptr)
    out["after_free"] = os.path.exists(os.path.join(store, handle.segment_name))
    return out


@needs_root
def test_a_user_can_export_into_an_admin_provisioned_store(temp_store):
    # BRIEF section 5: an admin may provision a shared store, owned by root with the sticky
    # bit.  Its users may create entries but not list them, so the first export's sweep
    # cannot enumerate the store; that must not make the export fail.
    os.chmod(temp_store.path, 0o1733)
    got = in_fork(_export_as_nobody, temp_store.path)
    assert got == {"segment": [NOBODY, "0o600"], "after_free": False}


def _segment_symlink(s: TempStore) -> str:
    os.rename(s.segment, s.segment + ".real")
    os.symlink(s.segment + ".real", s.segment)
    return "symbolic link"


def _segment_exec_bit(s: TempStore) -> str:
    os.chmod(s.segment, 0o700)
    return "expected mode"


def _segment_setuid_bit(s: TempStore) -> str:
    os.chmod(s.segment, 0o4600)
    return "expected mode"


def _segment_truncated(s: TempStore) -> str:
    os.truncate(s.segment, PAGE_SIZE)
    return "does not match"


def _segment_header_rewritten(s: TempStore) -> str:
    fd = os.open(s.segment, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xff", 20)  # inside the verifier
    finally:
        os.close(fd)
    return "does not match"


def _segment_owner(s: TempStore) -> str:
    os.chown(s.segment, NOBODY, NOBODY)
    return f"uid {NOBODY}"


SEGMENT_TAMPERING = [
    _segment_symlink,
    _segment_exec_bit,
    _segment_setuid_bit,
    _segment_truncated,
    _segment_header_rewritten,
    pytest.param(_segment_owner, marks=needs_root),
]


@pytest.mark.parametrize("tamper", SEGMENT_TAMPERING, ids=lambda f: getattr(f, "__name__", f))
def test_a_tampered_segment_is_refused_on_import(temp_store, tamper):
    reason = tamper(temp_store)
    got = temp_store.probe()
    code, message = got["import"]
    assert code == "hipErrorInvalidHandle" and reason in message, got
    assert got["export"] == ["ok", ""]  # the store itself is fine


# -- a foreign uid ---------------------------------------------------------------------


def become(uid: int, gid: int) -> None:
    # Supplementary groups first, or root's group 0 would still grant group access.
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _foreign_view(raw: bytes, store: str, segment: str, uid: int, gid: int) -> dict:
    """In a forked child: drop to ``uid``/``gid``, then try what an attacker would."""
    become(uid, gid)
    out = {"uid": os.geteuid()}
    try:
        ptr = hip.hipIpcOpenMemHandle(raw)
    except hip.HipError as exc:
        out["open"] = [exc.code.name, exc.detail]
    else:
        data = hip.asarray(ptr, 4096)
        out["open"] = ["ok", bytes(data[:4]).hex()]
        data[:4] = 0xEE
        del data
        hip.hipIpcCloseMemHandle(ptr)
    for name, fn in (("listdir", os.listdir), ("scandir", lambda p: list(os.scandir(p)))):
        try:
            fn(store)
            out[name] = "listed"
        except OSError as exc:
            out[name] = type(exc).__name__
    try:
        with open(segment, "rb") as f:
            f.read(1)
        out["read_file"] = "read"
    except OSError as exc:
        out["read_file"] = type(exc).__name__
    return out


@needs_root
def test_a_foreign_uid_is_refused_with_the_reason_and_cannot_list_the_store(exported):
    _, handle = exported()
    segment = os.path.join(store_path(), handle.segment_name)
    got = in_fork(_foreign_view, bytes(handle), store_path(), segment, NOBODY, NOBODY)
    assert got["uid"] == NOBODY
    code, detail = got["open"]
    assert code == "hipErrorInvalidHandle"  # 400, hipErrorInvalidResourceHandle
    assert "permission denied" in detail and f"not shared with uid {NOBODY}" in detail
    assert "HIPIPC_SHARE=all" in detail  # and how the exporter can allow it
    assert got["listdir"] == got["scandir"] == "PermissionError"
    assert got["read_file"] == "PermissionError"


@needs_root
def test_a_foreign_uid_can_open_once_the_exporter_shares_with_all(exported):
    ptr, handle = exported(share="all")
    segment = os.path.join(store_path(), handle.segment_name)
    got = in_fork(_foreign_view, bytes(handle), store_path(), segment, NOBODY, NOBODY)
    assert got["open"] == ["ok", "00010203"]
    assert got["listdir"] == "PermissionError"  # sharing a segment never lists the store
    assert bytes(hip.asarray(ptr, 5)) == b"\xee" * 4 + b"\x04"  # its writes landed here
    assert not os.path.exists(HandleStore().path_for(NOBODY))  # importing made no store


@needs_root
def test_group_sharing_admits_the_group_and_no_one_else(exported):
    ptr, handle = exported(share="group")
    segment = os.path.join(store_path(), handle.segment_name)
    group = os.stat(segment).st_gid
    other = NOBODY if group != NOBODY else NOBODY - 1
    outsider = in_fork(_foreign_view, bytes(handle), store_path(), segment, NOBODY, other)
    assert outsider["open"][0] == "hipErrorInvalidHandle"
    assert "permission denied" in outsider["open"][1]
    member = in_fork(_foreign_view, bytes(handle), store_path(), segment, NOBODY, group)
    assert member["open"] == ["ok", "00010203"]
    assert bytes(hip.asarray(ptr, 4)) == b"\xee" * 4


@needs_root
def test_a_foreign_uid_cannot_pass_off_a_handle_as_its_own(exported):
    # A handle claiming the foreign uid as exporter names that uid's store, where no such
    # segment exists: rewriting the uid field cannot reach root's segment.
    _, handle = exported(share="all")
    raw = bytearray(bytes(handle))
    raw[36:40] = NOBODY.to_bytes(4, "little")
    segment = os.path.join(store_path(), handle.segment_name)
    got = in_fork(_foreign_view, bytes(raw), store_path(), segment, NOBODY, NOBODY)
    assert got["open"][0] == "hipErrorInvalidHandle"
    assert not os.path.exists(HandleStore().path_for(NOBODY))  # and it created nothing
