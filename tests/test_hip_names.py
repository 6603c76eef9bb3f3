"""HIP's names, codes and messages (issue 11 §6).

Rules covered: every ``hipError_t`` member is a module-level name in ``__all__``; 400 has one
spelling (``hipErrorInvalidHandle``) in ``.name``, messages and the README, with
``hipErrorInvalidResourceHandle`` an alias; ``hipIpcGetEventHandle`` of a non-IPC event is
``hipErrorInvalidConfiguration``; ``hipFree`` of an import points to ``hipIpcCloseMemHandle``;
a parent's pointer used in a forked child says where it comes from; no message shows more
than 80 characters of an argument's repr; every integer argument accepts numpy integers and
refuses ``bool``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from _proc import in_fork

import hipipc as hip
from hipipc.errors import short_repr

E = hip.hipError_t
README = Path(__file__).resolve().parent.parent / "README.md"
LONG = "Z" * 81  # no message may hold this much of one argument


# -- names -----------------------------------------------------------------------------


def test_every_hip_error_member_is_a_module_level_name():
    assert len(E.__members__) > len(E)  # aliases included
    for name, member in E.__members__.items():
        assert getattr(hip, name) is member, name
        assert getattr(hip.errors, name) is member, name
        assert name in hip.__all__ and name in hip.errors.__all__, name
    assert hip.hipSuccess == 0 and hip.hipErrorNotReady == 600
    namespace: dict = {}
    exec("from hipipc import *", namespace)
    assert namespace["hipErrorInvalidResourceHandle"] is E.hipErrorInvalidHandle


def test_400_has_one_spelling_in_names_messages_and_the_readme():
    assert hip.hipErrorInvalidResourceHandle is hip.hipErrorInvalidHandle
    for code in (400, E.hipErrorInvalidResourceHandle, np.int64(400)):
        err = hip.HipError(code, "why")
        assert err.code.name == "hipErrorInvalidHandle"
        assert str(err).startswith("hipErrorInvalidHandle (400): ")
    assert repr(E(400)) == "<hipError_t.hipErrorInvalidHandle: 400>"
    assert hip.hipGetErrorName(400) == "hipErrorInvalidHandle"
    text = README.read_text()
    assert "`hipErrorInvalidHandle`" in text
    for line in text.splitlines():
        if "hipErrorInvalidResourceHandle" in line:
            assert "alias" in line, line  # the README names the alias only as such


def test_error_name_and_string_take_integers_only():
    assert hip.hipGetErrorName(np.int32(600)) == "hipErrorNotReady"
    assert hip.hipGetErrorString(np.uint16(2)) == "out of memory"
    assert hip.hipGetErrorName(12345) == "hipErrorUnknown"
    for bad in (True, 1.0, "1", None):
        for fn in (hip.hipGetErrorName, hip.hipGetErrorString):
            with pytest.raises(hip.HipError) as exc:
                fn(bad)
            assert exc.value.code == E.hipErrorInvalidValue, (fn, bad)


def test_ipc_handle_of_a_non_ipc_event_is_invalid_configuration():
    for flags in (hip.hipEventDefault, hip.hipEventDisableTiming, hip.hipEventBlockingSync):
        ev = hip.hipEventCreateWithFlags(flags)
        try:
            with pytest.raises(hip.HipError) as exc:
                hip.hipIpcGetEventHandle(ev)
            assert exc.value.code == E.hipErrorInvalidConfiguration
            assert "hipEventInterprocess" in exc.value.detail
        finally:
            hip.hipEventDestroy(ev)


# -- pointers from elsewhere -----------------------------------------------------------


def _free_an_import(raw: bytes) -> list:
    ptr = hip.hipIpcOpenMemHandle(raw)
    try:
        hip.hipFree(ptr)
        return ["freed"]
    except hip.HipError as exc:
        return [exc.code.name, exc.detail]
    finally:
        hip.hipIpcCloseMemHandle(ptr)


def test_hip_free_of_an_imported_pointer_points_to_hip_ipc_close_mem_handle():
    ptr = hip.hipMalloc(4096)
    try:
        got = in_fork(_free_an_import, bytes(hip.hipIpcGetMemHandle(ptr)), timeout=60)
    finally:
        hip.hipFree(ptr)
    assert got[0] == "hipErrorInvalidValue" and "hipIpcCloseMemHandle" in got[1], got


def _use_parent_pointers(ptrs: list[int], fork_again: bool) -> list:
    base, interior, unknown = ptrs
    calls = [
        lambda: hip.hipFree(base),
        lambda: hip.hipMemset(interior, 1, 8),
        lambda: hip.hipMemsetAsync(base, 1, 8, None),
        lambda: hip.hipMemcpy(bytearray(8), interior, 8, hip.hipMemcpyDeviceToHost),
        lambda: hip.hipMemGetAddressRange(interior),
        lambda: hip.hipIpcGetMemHandle(base),
        lambda: hip.hipIpcCloseMemHandle(base),
        lambda: hip.asarray(interior, 8),
    ]
    out = []
    for call in calls:
        try:
            call()
            out.append(["ok", ""])
        except hip.HipError as exc:
            out.append([exc.code.name, exc.detail])
    try:
        hip.hipFree(unknown)
        out.append(["ok", ""])
    except hip.HipError as exc:
        out.append([exc.code.name, exc.detail])
    # The child's own memory works as usual.
    mine = hip.hipMalloc(64)
    hip.hipMemset(mine, 7, 64)
    out.append(int(hip.asarray(mine, 64)[5]))
    hip.hipFree(mine)
    if fork_again:
        out.append(in_fork(_use_parent_pointers, ptrs, False, timeout=60))
    return out


def test_a_parent_pointer_used_in_a_forked_child_says_it_comes_from_the_parent():
    base = hip.hipMalloc(1 << 16)
    try:
        ptrs = [base, base + 100, 0x1000]
        got = in_fork(_use_parent_pointers, ptrs, True, timeout=90)
    finally:
        hip.hipFree(base)
    parent = f"parent process {os.getpid()}"

    def check(out: list) -> None:
        for i, (code, detail) in enumerate(out[:8]):
            # hipMemGetAddressRange (call 4) answers HIP's hipErrorNotFound for any pointer
            # no allocation holds; the message still says where the pointer came from.
            want = "hipErrorNotFound" if i == 4 else "hipErrorInvalidValue"
            assert code == want and parent in detail, (code, detail)
            assert "hipIpcOpenMemHandle" in detail
        code, detail = out[8]
        assert code == "hipErrorInvalidValue" and "parent" not in detail, detail
        assert out[9] == 7

    check(got)
    check(got[10])  # a grandchild: the pointer is still the original process's


# -- messages --------------------------------------------------------------------------


class _Loud:
    """An argument whose repr is long (and which is no integer, buffer or stream)."""

    def __repr__(self) -> str:
        return "<" + "Z" * 5000 + ">"


class _Broken:
    def __repr__(self) -> str:
        raise RuntimeError("repr fails")


def test_short_repr():
    assert short_repr("abc") == "'abc'"
    assert len(short_repr("x" * 10**6)) == 80
    assert len(short_repr(_Loud())) == 80 and short_repr(_Loud()).endswith("...")
    assert short_repr(_Broken()) == "<_Broken object>"
    assert len(short_repr(list(range(1000)), 20)) == 20


def test_no_message_shows_more_than_80_characters_of_an_argument():
    loud, big_str = _Loud(), "Z" * 5000
    ptr = hip.hipMalloc(64)
    s = hip.hipStreamCreate()
    ev = hip.hipEventCreate()
    try:
        calls = []
        for bad in (loud, big_str, _Broken()):
            calls += [
                lambda b=bad: hip.hipMalloc(b),
                lambda b=bad: hip.hipFree(b),
                lambda b=bad: hip.hipSetDevice(b),
                lambda b=bad: hip.hipMemset(ptr, b, 8),
                lambda b=bad: hip.hipMemset(b, 0, 8),
                lambda b=bad: hip.hipMemcpy(bytearray(8), ptr, 8, b),
                lambda b=bad: hip.hipMemcpyAsync(b, ptr, 8, hip.hipMemcpyDeviceToHost, s),
                lambda b=bad: hip.hipIpcGetMemHandle(b),
                lambda b=bad: hip.hipIpcOpenMemHandle(b"\0" * 64, b),
                lambda b=bad: hip.hipIpcCloseMemHandle(b),
                lambda b=bad: hip.hipStreamCreateWithFlags(b),
                lambda b=bad: hip.hipStreamWaitEvent(s, ev, b),
                lambda b=bad: hip.hipStreamSynchronize(b),
                lambda b=bad: hip.hipEventCreateWithFlags(b),
                lambda b=bad: hip.hipEventRecord(b, s),
                lambda b=bad: hip.hipLaunchHostFunc(s, b),
                lambda b=bad: hip.asarray(ptr, b),
                lambda b=bad: hip.asarray(b, 8),
                lambda b=bad: hip.hipGetErrorName(b),
            ]
        # Out-of-range integers are shown too, and are short by nature; huge ones are cut.
        calls += [
            lambda: hip.hipMemcpy(bytearray(8), ptr, 8, 10**200),
            lambda: hip.hipStreamCreateWithFlags(10**200),
            lambda: hip.hipIpcOpenMemHandle(b"\0" * 64, 10**200),
            lambda: hip.hipStreamWaitEvent(s, ev, 10**200),
        ]
        for i, call in enumerate(calls):
            with pytest.raises(hip.HipError) as exc:
                call()
            assert LONG not in str(exc.value) and "9" * 81 not in str(exc.value), i
            assert len(str(exc.value)) < 400, (i, str(exc.value))
        # A host function with a long repr and no __qualname__, failing: the report is short.

        class Callable:
            __qualname__ = "Z" * 500

            def __call__(self) -> None:
                raise ValueError("boom")

        hip.hipLaunchHostFunc(s, Callable())
        with pytest.raises(hip.HipError) as exc:
            hip.hipStreamSynchronize(s, timeout=20)
        assert LONG not in exc.value.detail
    finally:
        hip.hipStreamDestroy(s)
        hip.hipEventDestroy(ev)
        hip.hipFree(ptr)
        hip.hipDeviceSynchronize(timeout=20)


# -- integer arguments -----------------------------------------------------------------


INTEGER_TYPES = [int, np.int8, np.uint8, np.int32, np.int64, np.uint64, np.intp]


@pytest.mark.parametrize("as_int", INTEGER_TYPES, ids=lambda t: t.__name__)
def test_every_integer_argument_accepts_any_integer_type(as_int):
    big = np.int64 if as_int in (np.int8, np.uint8) else as_int  # sizes past 255 need 64 bits

    def p(value: int):
        return np.uint64(value) if as_int in (np.int8, np.uint8, np.int32) else big(value)

    ptr = hip.hipMalloc(big(4096))
    s = hip.hipStreamCreateWithFlags(as_int(hip.hipStreamNonBlocking))
    ev = hip.hipEventCreateWithFlags(as_int(hip.hipEventDisableTiming))
    try:
        assert not s.blocking and not ev.timing
        hip.hipSetDevice(as_int(0))
        hip.hipMemset(p(ptr), as_int(7), big(4096))
        hip.hipMemsetAsync(p(ptr + 8), as_int(9), as_int(8), s)
        hip.hipStreamWaitEvent(s, ev, as_int(0))
        hip.hipStreamSynchronize(s, timeout=20)
        out = np.zeros(16, np.uint8)
        hip.hipMemcpy(out, p(ptr), as_int(16), as_int(hip.hipMemcpyDeviceToHost))
        assert out.tolist() == [7] * 8 + [9] * 8
        hip.hipMemcpyAsync(out, p(ptr + 4), as_int(4), as_int(hip.hipMemcpyDefault), s)
        hip.hipStreamSynchronize(s, timeout=20)
        assert hip.hipMemGetAddressRange(p(ptr + 100)) == (ptr, 4096)
        assert hip.asarray(p(ptr), (as_int(2), as_int(4)), np.uint8).shape == (2, 4)
        assert hip.asarray(p(ptr), as_int(8)).shape == (8,)
        assert hip.hipIpcGetMemHandle(p(ptr)) == hip.hipIpcGetMemHandle(ptr)
        assert hip.hipGetErrorName(as_int(1)) == "hipErrorInvalidValue"
    finally:
        hip.hipStreamDestroy(s)
        hip.hipEventDestroy(ev)
        hip.hipFree(p(ptr))


def _open_with_numpy_flags(raw: bytes) -> list:
    out = []
    for flags in (True, 1.0, "1", np.float64(1)):
        try:
            hip.hipIpcOpenMemHandle(raw, flags)
            out.append("opened")
        except hip.HipError as exc:
            out.append(exc.code.name)
    ptr = hip.hipIpcOpenMemHandle(raw, np.int64(1))
    assert hip.hipIpcOpenMemHandle(raw, np.uint8(1)) == ptr
    hip.hipIpcCloseMemHandle(np.uint64(ptr))
    hip.hipIpcCloseMemHandle(np.int64(ptr))
    out.append("closed")
    return out


def test_ipc_open_and_close_accept_numpy_integers_and_refuse_bool():
    ptr = hip.hipMalloc(4096)
    try:
        got = in_fork(_open_with_numpy_flags, bytes(hip.hipIpcGetMemHandle(ptr)), timeout=60)
    finally:
        hip.hipFree(ptr)
    assert got == ["hipErrorInvalidValue"] * 4 + ["closed"]


def test_bool_is_refused_for_every_integer_argument():
    ptr = hip.hipMalloc(64)
    s = hip.hipStreamCreate()
    ev = hip.hipEventCreate()
    out = bytearray(8)
    try:
        for b in (True, False, np.bool_(True)):
            cases = _bool_cases(b, ptr, s, ev, out)
            for i, (call, code) in enumerate(cases):
                with pytest.raises(hip.HipError) as exc:
                    call()
                assert exc.value.code == code, (b, i, exc.value)
        # Floats are no integers either, even when whole.
        for call in (
            lambda: hip.hipMemcpy(out, ptr, 8, 2.0),
            lambda: hip.hipStreamCreateWithFlags(1.0),
            lambda: hip.hipStreamWaitEvent(s, ev, 0.0),
            lambda: hip.hipMalloc(8.0),
        ):
            with pytest.raises(hip.HipError):
                call()
        assert re.search(r"\bbool\b", _detail(lambda: hip.hipMalloc(True)))
    finally:
        hip.hipStreamDestroy(s)
        hip.hipEventDestroy(ev)
        hip.hipFree(ptr)


def _bool_cases(b, ptr, s, ev, out) -> list:
    return [
        (lambda: hip.hipMalloc(b), E.hipErrorInvalidValue),
        (lambda: hip.hipFree(b), E.hipErrorInvalidValue),
        (lambda: hip.hipSetDevice(b), E.hipErrorInvalidDevice),
        (lambda: hip.hipMemset(ptr, b, 8), E.hipErrorInvalidValue),
        (lambda: hip.hipMemset(ptr, 0, b), E.hipErrorInvalidValue),
        (lambda: hip.hipMemset(b, 0, 8), E.hipErrorInvalidValue),
        (lambda: hip.hipMemsetAsync(ptr, b, 8, s), E.hipErrorInvalidValue),
        (lambda: hip.hipMemcpy(out, ptr, 8, b), E.hipErrorInvalidMemcpyDirection),
        (lambda: hip.hipMemcpy(out, ptr, b, 2), E.hipErrorInvalidValue),
        (lambda: hip.hipMemcpyAsync(out, ptr, 8, b, s), E.hipErrorInvalidMemcpyDirection),
        (lambda: hip.hipMemGetAddressRange(b), E.hipErrorInvalidValue),
        (lambda: hip.hipIpcGetMemHandle(b), E.hipErrorInvalidValue),
        (lambda: hip.hipIpcCloseMemHandle(b), E.hipErrorInvalidValue),
        (lambda: hip.hipStreamCreateWithFlags(b), E.hipErrorInvalidValue),
        (lambda: hip.hipStreamWaitEvent(s, ev, b), E.hipErrorInvalidValue),
        (lambda: hip.hipEventCreateWithFlags(b), E.hipErrorInvalidValue),
        (lambda: hip.asarray(ptr, b), E.hipErrorInvalidValue),
        (lambda: hip.asarray(ptr, (2, b)), E.hipErrorInvalidValue),
        (lambda: hip.asarray(b, 8), E.hipErrorInvalidValue),
        (lambda: hip.hipGetErrorName(b), E.hipErrorInvalidValue),
    ]


def _detail(call) -> str:
    try:
        call()
    except hip.HipError as exc:
        return exc.detail
    raise AssertionError("no HipError")
