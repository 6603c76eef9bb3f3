"""The 64-byte handles as value types, HipError, and handle bytes as untrusted input.

The fuzzing half feeds bytes through the real open path (``hipIpcOpenMemHandle`` in a process
that is not the exporter: the exporter would get hipErrorInvalidContext for its own handle),
because a parser that is only tested on its own can still be bypassed by the code around it.
"""

from __future__ import annotations

import base64
import copy
import ctypes
import hashlib
import os
import pickle
import struct

import numpy as np
import pytest
from _proc import Exporter, pattern, run_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hipipc as hip
from hipipc.handle import HANDLE_SIZE, HandleKind, node_tag

E = hip.hipError_t
REFUSED = {E.hipErrorInvalidValue, E.hipErrorInvalidResourceHandle}
SECRET = slice(8, 24)
NODE = slice(6, 8)


def made_handle(
    secret: bytes = b"S3cr3t-Bytes!!42",
    size: int = 4096,
    device: int = 0,
    uid: int | None = None,
    kind: HandleKind = HandleKind.HOST_MEMORY,
    node: int | None = None,
    tail: bytes = bytes(24),
) -> bytes:
    """Handle bytes laid out by hand (see hipipc/handle.py), independent of the parser."""
    uid = os.geteuid() if uid is None else uid
    node = node_tag() if node is None else node
    return struct.pack(
        "<4sBBH16sQII24s", b"HIPC", 1, int(kind), node, secret, size, device, uid, tail
    )


def encodings(secret: bytes) -> list[str]:
    """Every way a secret could leak into text: hex, base64, repr, ints, latin-1."""
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        base64.b32encode(secret).decode(),
        repr(secret),
        str(list(secret))[1:-1],
        secret.decode("latin-1"),
        secret.hex(" "),
        secret.hex(":"),
    ]


@pytest.fixture
def exported():
    """A real exported allocation of this process: (pointer, handle); freed afterwards."""
    ptr = hip.hipMalloc(4096)
    try:
        yield ptr, hip.hipIpcGetMemHandle(ptr)
    finally:
        hip.hipFree(ptr)


# -- value semantics -------------------------------------------------------------------


def test_a_handle_is_64_bytes_and_bytes_round_trips(exported):
    _, handle = exported
    raw = bytes(handle)
    assert type(raw) is bytes and len(raw) == len(handle) == HANDLE_SIZE == 64
    assert raw[:4] == b"HIPC"
    again = hip.IpcMemHandle(raw)
    assert again == handle and bytes(again) == raw
    assert (again.size, again.device, again.uid) == (4096, 0, os.geteuid())


def test_handles_from_every_bytes_like_equal_and_hash_alike(exported):
    _, handle = exported
    raw = bytes(handle)
    struct_slot = bytearray(16) + raw + bytearray(16)  # a byte slot inside a bigger struct
    sources = [
        bytearray(raw),
        memoryview(raw),
        memoryview(struct_slot)[16:80],
        np.frombuffer(raw, dtype=np.uint8).copy(),
        np.frombuffer(raw, dtype=np.int32).copy(),  # 16 ints, still 64 bytes
        (ctypes.c_ubyte * 64).from_buffer_copy(raw),
        (ctypes.c_char * 64).from_buffer_copy(raw),
        handle,
    ]
    for src in sources:
        h = hip.IpcMemHandle(src)
        assert h == handle and hash(h) == hash(handle), type(src)
    assert len({hip.IpcMemHandle(s) for s in sources}) == 1


def test_a_handle_copies_its_bytes_so_later_writes_do_not_change_it(exported):
    _, handle = exported
    buf = bytearray(bytes(handle))
    h = hip.IpcMemHandle(buf)
    buf[10] ^= 0xFF
    assert h == handle and bytes(h) == bytes(handle)


def test_different_allocations_have_different_unequal_handles(exported):
    _, handle = exported
    other = hip.hipMalloc(4096)
    try:
        h2 = hip.hipIpcGetMemHandle(other)
        assert h2 != handle and bytes(h2)[SECRET] != bytes(handle)[SECRET]
        assert len({handle, h2}) == 2
    finally:
        hip.hipFree(other)


def test_handle_fields_are_read_only(exported):
    # A value type used as a dict key must not change under its holder; a size or uid
    # rewritten in place would also make the handle name another store or segment.
    _, handle = exported
    for field, value in (("size", 1), ("uid", 12345), ("device", 3), ("kind", 2)):
        with pytest.raises(AttributeError):
            setattr(handle, field, value)
    assert handle.size == 4096 and handle.uid == os.geteuid()


@pytest.mark.parametrize(
    "bad", [b"", bytes(63), bytes(65), b"x" * 64, 64, None, "H" * 64, list(range(64)), 1.5]
)
def test_malformed_input_is_invalid_value(bad):
    with pytest.raises(hip.HipError) as exc:
        hip.IpcMemHandle(bad)
    assert exc.value.code == E.hipErrorInvalidValue


def test_non_contiguous_buffers_are_invalid_value(exported):
    _, handle = exported
    wide = np.zeros(128, dtype=np.uint8)
    wide[::2] = np.frombuffer(bytes(handle), dtype=np.uint8)
    with pytest.raises(hip.HipError) as exc:
        hip.IpcMemHandle(wide[::2])  # 64 bytes, but strided
    assert exc.value.code == E.hipErrorInvalidValue


def test_memory_and_event_handles_do_not_parse_as_each_other():
    mem = made_handle(kind=HandleKind.HOST_MEMORY)
    event = made_handle(kind=HandleKind.HOST_EVENT, size=64)
    assert hip.IpcMemHandle(mem).kind == HandleKind.HOST_MEMORY
    assert hip.IpcEventHandle(event).kind == HandleKind.HOST_EVENT
    for cls, raw in ((hip.IpcEventHandle, mem), (hip.IpcMemHandle, event)):
        with pytest.raises(hip.HipError) as exc:
            cls(raw)
        assert exc.value.code == E.hipErrorInvalidValue


def test_handles_pickle_as_their_plain_bytes(exported):
    _, handle = exported
    assert handle.__reduce__() == (hip.IpcMemHandle, (bytes(handle),))
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(handle, protocol=proto))
        assert type(back) is hip.IpcMemHandle and back == handle
    event = hip.IpcEventHandle(made_handle(kind=HandleKind.HOST_EVENT, size=64))
    assert pickle.loads(pickle.dumps(event)) == event
    assert copy.copy(handle) == handle and copy.deepcopy(handle) == handle


def test_repr_and_str_never_show_the_secret():
    # A secret of printable bytes, so that repr(bytes) and latin-1 would show it plainly.
    secret = b"S3cr3t-Bytes!!42"
    for cls, kind in (
        (hip.IpcMemHandle, HandleKind.HOST_MEMORY),
        (hip.IpcEventHandle, HandleKind.HOST_EVENT),
    ):
        h = cls(made_handle(secret, kind=kind))
        shown = [repr(h), str(h), f"{h}", f"{h!r}", repr([h]), repr({h: 1})]
        for text in shown:
            assert h.fingerprint in text
            for leak in encodings(secret) + [bytes(h).hex()]:
                assert leak not in text, (leak, text)


def test_repr_of_a_real_handle_hides_its_secret(exported):
    _, handle = exported
    secret = bytes(handle)[SECRET]
    text = repr(handle)
    assert "size=4096" in text and "IpcMemHandle" in text
    for leak in encodings(secret):
        assert leak not in text
    for i in range(len(secret) - 3):  # not even 4 consecutive secret bytes, as hex
        assert secret[i : i + 4].hex() not in text


# -- HipError and the error table ------------------------------------------------------


def test_hip_error_pickles_with_code_and_detail():
    err = hip.HipError(E.hipErrorInvalidResourceHandle, "freed by its exporter")
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(err, protocol=proto))
        assert type(back) is hip.HipError and isinstance(back, RuntimeError)
        assert back.code is E.hipErrorInvalidResourceHandle and back.detail == err.detail
        assert str(back) == str(err)
    bare = pickle.loads(pickle.dumps(hip.HipError(2)))
    assert bare.code is E.hipErrorOutOfMemory and bare.detail == ""
    assert str(bare) == "hipErrorOutOfMemory (2): out of memory"


def test_hip_error_from_a_child_process_keeps_its_code():
    # The pickled form is what multiprocessing ships; load one made by another interpreter.
    out = run_json("""
        import json, pickle
        import hipipc as hip
        try:
            hip.hipIpcOpenMemHandle(b"short")
        except hip.HipError as exc:
            print(json.dumps(pickle.dumps(exc).hex()))
    """)
    err = pickle.loads(bytes.fromhex(out))
    assert err.code == E.hipErrorInvalidValue and "64 bytes" in err.detail


def test_error_codes_have_hips_values():
    expected = {
        "hipSuccess": 0,
        "hipErrorInvalidValue": 1,
        "hipErrorOutOfMemory": 2,
        "hipErrorInvalidMemcpyDirection": 21,
        "hipErrorInvalidDevice": 101,
        "hipErrorInvalidContext": 201,
        "hipErrorMapFailed": 205,
        "hipErrorInvalidResourceHandle": 400,
        "hipErrorNotReady": 600,
        "hipErrorNotSupported": 801,
        "hipErrorMemoryAllocation": 2,
    }
    for name, value in expected.items():
        assert int(getattr(E, name)) == value


def test_error_names_and_strings_cover_every_code():
    for code in E:
        assert hip.hipGetErrorName(code) == code.name
        assert hip.hipGetErrorName(int(code)) == code.name
        text = hip.hipGetErrorString(code)
        assert text and text == hip.hipGetErrorString(int(code))
        assert str(hip.HipError(code)).startswith(f"{code.name} ({int(code)}): {text}")
    assert hip.hipGetErrorName(0) == "hipSuccess" and hip.hipGetErrorString(0) == "no error"
    assert hip.hipGetErrorName(400) == "hipErrorInvalidHandle"  # HIP's own name for 400
    assert hip.hipGetErrorString(1) == "invalid argument"


@pytest.mark.parametrize("value", [-1, 5, 12345, 2**40])
def test_unknown_error_values_are_reported_as_unknown(value):
    assert hip.hipGetErrorName(value) == "hipErrorUnknown"
    assert hip.hipGetErrorString(value) == "unknown error"
    assert hip.HipError(value).code is E.hipErrorUnknown


# -- untrusted bytes through the real open path ----------------------------------------

# One exporter for the whole module: a spawned interpreter (not a fork) holding two live,
# filled allocations, so the fuzzing below runs in a process that is not the exporter.
SIZES = [4096, 3 * 4096 + 123]


@pytest.fixture(scope="module")
def live():
    with Exporter(SIZES) as exporter:
        yield exporter


def open_must_be_refused(raw) -> hip.HipError | str:
    """Open ``raw``; return the HipError, or a description of what went wrong instead."""
    try:
        ptr = hip.hipIpcOpenMemHandle(raw)
    except hip.HipError as exc:
        if exc.code not in REFUSED:
            return f"wrong code {exc.code.name}: {exc}"
        return exc
    except BaseException as exc:  # any other exception is a parser bug
        return f"{type(exc).__name__}: {exc}"
    hip.hipIpcCloseMemHandle(ptr)
    return "opened"


def check_live_handles_open(exporter: Exporter) -> None:
    """Each handle still opens and shows its data, here and in a fresh interpreter."""
    for i, raw in enumerate(exporter.handles):
        ptr = hip.hipIpcOpenMemHandle(raw)
        try:
            assert bytes(hip.asarray(ptr, SIZES[i])) == pattern(i, SIZES[i])
        finally:
            hip.hipIpcCloseMemHandle(ptr)
    sums = run_json(
        """
        import hashlib, json, sys
        import hipipc as hip
        out = []
        for raw in sys.argv[1:]:
            ptr = hip.hipIpcOpenMemHandle(bytes.fromhex(raw))
            size = hip.hipMemGetAddressRange(ptr)[1]
            out.append(hashlib.sha256(bytes(hip.asarray(ptr, size))).hexdigest())
            hip.hipIpcCloseMemHandle(ptr)
        print(json.dumps(out))
    """,
        *(h.hex() for h in exporter.handles),
    )
    assert sums == [hashlib.sha256(pattern(i, s)).hexdigest() for i, s in enumerate(SIZES)]


def test_every_single_bit_flip_of_a_live_handle_is_refused(live):
    # Exhaustive, not sampled: all 512 flips of each live handle.  Reserved bytes are
    # checked and every other field feeds the segment name, so none may open anything.  A
    # flipped node-tag bit names another node, and is refused as one before any lookup.
    failures = []
    for h_index, raw in enumerate(live.handles):
        secret = raw[SECRET]
        for bit in range(HANDLE_SIZE * 8):
            flipped = bytearray(raw)
            flipped[bit // 8] ^= 1 << (bit % 8)
            source = bytes(flipped) if bit % 2 else flipped  # both spellings of "bytes"
            result = open_must_be_refused(source)
            if not isinstance(result, hip.HipError):
                failures.append((h_index, bit, result))
            elif (NODE.start * 8 <= bit < NODE.stop * 8) != ("another node" in str(result)):
                failures.append((h_index, bit, f"node-tag message wrong: {result}"))
            elif any(leak in str(result) for leak in encodings(secret)):
                failures.append((h_index, bit, f"message shows the secret: {result}"))
    assert failures == []
    check_live_handles_open(live)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=st.binary(min_size=64, max_size=64).filter(any), which=st.sampled_from([0, 1]))
def test_any_corruption_of_a_live_handle_is_refused(live, mask, which):
    raw = live.handles[which]
    corrupted = bytes(a ^ b for a, b in zip(raw, mask, strict=True))
    result = open_must_be_refused(corrupted)
    assert isinstance(result, hip.HipError), result


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_of_any_length_are_refused(live, data):
    result = open_must_be_refused(data)
    assert isinstance(result, hip.HipError), result
    if len(data) != HANDLE_SIZE:
        assert result.code == E.hipErrorInvalidValue


# Well-formed headers with arbitrary fields get past the parser into the store lookup.
plausible = st.builds(
    lambda kind, node, secret, size, device, uid, tail: struct.pack(
        "<4sBBH16sQII24s", b"HIPC", 1, kind, node, secret, size, device, uid, tail
    ),
    kind=st.sampled_from([0, 1, 2, 3, 4, 5, 255]),
    node=st.sampled_from([node_tag(), node_tag(), node_tag(), 0, node_tag() ^ 1, 0xFFFF]),
    secret=st.binary(min_size=16, max_size=16),
    size=st.one_of(st.sampled_from([0, 1, 4096, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)),
    device=st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
    uid=st.one_of(st.just(os.geteuid()), st.integers(0, 2**32 - 1)),
    tail=st.one_of(st.just(bytes(24)), st.binary(min_size=24, max_size=24)),
)


@settings(max_examples=400, deadline=None)
@given(raw=plausible, as_type=st.sampled_from([bytes, bytearray, memoryview]))
def test_plausible_garbage_handles_are_refused(live, raw, as_type):
    result = open_must_be_refused(as_type(raw))
    assert isinstance(result, hip.HipError), result


def test_garbage_handles_of_the_gpu_kind_are_refused(live):
    # Kind 2 (GPU memory) is one byte value away from host memory: random bytes hit it, no
    # single-bit flip of a host handle does (1 -> 2 takes two flips).  A host-backend process
    # must still say "names nothing", not "not supported", for a handle that names nothing.
    results = [
        open_must_be_refused(
            made_handle(secret=bytes([i]) * 16, size=4096 << i, kind=HandleKind.GPU_MEMORY)
        )
        for i in range(4)
    ]
    assert all(isinstance(r, hip.HipError) for r in results), results


@settings(max_examples=100, deadline=None)
@given(
    obj=st.one_of(
        st.none(),
        st.integers(),
        st.floats(),
        st.text(max_size=80),
        st.lists(st.integers(0, 255), min_size=64, max_size=64),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    )
)
def test_objects_that_are_not_bytes_are_invalid_value(obj):
    with pytest.raises(hip.HipError) as exc:
        hip.hipIpcOpenMemHandle(obj)
    assert exc.value.code == E.hipErrorInvalidValue


# -- the node tag (bytes 6..7) ---------------------------------------------------------


def test_a_handle_carries_this_nodes_tag_and_re_exports_byte_identical(exported):
    ptr, handle = exported
    assert 1 <= handle.node == node_tag() <= 0xFFFF
    assert struct.unpack_from("<H", bytes(handle), 6)[0] == node_tag()
    assert bytes(hip.hipIpcGetMemHandle(ptr)) == bytes(handle)
    assert bytes(hip.hipIpcGetMemHandle(ptr + 100)) == bytes(handle)


def test_a_zero_node_tag_or_a_nonzero_tail_does_not_parse():
    # Tags are 1..65535: zero is what a pre-tag handle held, and the 24-byte tail stays zero.
    cases = [
        ({"node": 0}, "no node tag"),
        ({"tail": b"\x01" + bytes(23)}, "reserved bytes"),
        ({"tail": bytes(23) + b"\x80"}, "reserved bytes"),
    ]
    for fields, why in cases:
        for cls, kind, size in (
            (hip.IpcMemHandle, HandleKind.HOST_MEMORY, 4096),
            (hip.IpcEventHandle, HandleKind.HOST_EVENT, 64),
        ):
            with pytest.raises(hip.HipError) as exc:
                cls(made_handle(kind=kind, size=size, **fields))
            assert exc.value.code == E.hipErrorInvalidValue and why in str(exc.value)


def test_a_live_handle_with_another_nodes_tag_is_refused_as_foreign(live):
    # Every other tag (a sample of them, and each single-bit neighbour) names another node:
    # refused with a message that says so, never opened and never "names nothing".
    raw = live.handles[0]
    tags = {node_tag() ^ (1 << b) for b in range(16)} | {1, 0xFFFF, 0x1234} - {node_tag()}
    for tag in sorted(tags):
        forged = raw[:6] + struct.pack("<H", tag) + raw[8:]
        result = open_must_be_refused(forged)
        assert isinstance(result, hip.HipError), (tag, result)
        assert result.code == E.hipErrorInvalidResourceHandle
        assert "another node" in str(result) and f"{tag:#06x}" in str(result)
        assert "no exported allocation" not in str(result)


NODE_CHILD = """
import json, sys
import hipipc as hip
from hipipc.handle import node_tag
result = {"tag": node_tag()}
try:
    ptr = hip.hipIpcOpenMemHandle(bytes.fromhex(sys.argv[1]))
    result["sum"] = int(hip.asarray(ptr, 4096).sum())
    hip.hipIpcCloseMemHandle(ptr)
except hip.HipError as exc:
    result["error"] = [int(exc.code), str(exc)]
print(json.dumps(result))
"""


def test_hipipc_node_id_puts_a_process_on_another_node(live):
    from _proc import child_env

    raw = live.handles[0].hex()
    here = run_json(NODE_CHILD, raw, env=child_env(HIPIPC_NODE_ID=None))
    assert here["tag"] == node_tag() and "error" not in here
    assert here["sum"] == sum(pattern(0, 4096))
    same = run_json(NODE_CHILD, raw, env=child_env(HIPIPC_NODE_ID=str(node_tag())))
    assert same["tag"] == node_tag() and "error" not in same
    other_tag = node_tag() % 0xFFFF + 1
    for value, tag in ((hex(other_tag), other_tag), ("rack7-node3", None)):
        away = run_json(NODE_CHILD, raw, env=child_env(HIPIPC_NODE_ID=value))
        assert away["tag"] != node_tag() and (tag is None or away["tag"] == tag)
        assert away["error"][0] == E.hipErrorInvalidResourceHandle
        assert "exported on another node" in away["error"][1]


@pytest.mark.parametrize("value", ["0", "65536", "-3", "0x10000"])
def test_a_bad_hipipc_node_id_is_invalid_value_at_the_first_handle(value):
    from _proc import child_env

    out = run_json(
        """
        import json
        import hipipc as hip
        try:
            hip.hipMalloc(4096)
            print(json.dumps("allocated"))
        except hip.HipError as exc:
            print(json.dumps([exc.code.name, str(exc)]))
    """,
        env=child_env(HIPIPC_NODE_ID=value),
    )
    assert out[0] == "hipErrorInvalidValue" and "HIPIPC_NODE_ID" in out[1], out


def test_the_node_tag_cannot_change_once_fixed(monkeypatch):
    from hipipc.handle import NODE_ENV, set_node_tag

    monkeypatch.setenv(NODE_ENV, str(node_tag()))  # set_node_tag exports it: undone after
    set_node_tag(node_tag())  # the same tag again is fine
    assert os.environ[NODE_ENV] == str(node_tag())
    for bad in (0, 0x10000, -1, True, "7"):
        with pytest.raises(hip.HipError) as exc:
            set_node_tag(bad)  # type: ignore[arg-type]
        assert exc.value.code == E.hipErrorInvalidValue
    with pytest.raises(hip.HipError) as exc:
        set_node_tag(node_tag() % 0xFFFF + 1)
    assert exc.value.code == E.hipErrorInvalidContext and "node tag" in str(exc.value)


def test_live_handles_still_open_after_the_fuzzing(live):
    # Runs after the fuzz tests in file order: a refused handle must not have damaged the
    # store, the exporter, or this process's ability to open the real thing.
    check_live_handles_open(live)
    assert live.command("sum 1") == hashlib.sha256(pattern(1, SIZES[1])).hexdigest()
