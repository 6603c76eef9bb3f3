"""The API fuzzer's child process (run by tests/test_fuzz_api.py; not a test module).

Usage: ``python tests/fuzz_api_child.py SEED SECONDS MAX_CALLS LOG``.  Calls every callable
in ``hipipc.__all__`` (plus the public classmethods of its classes and the methods of live
``DeviceBuffer``/``Mailbox`` objects) with random arguments drawn from pools of hostile
values, and prints one JSON line: the calls made and every exception that escaped other than
``HipError``, ``TypeError`` and ``ValueError`` (``TimeoutError``/``EOFError`` are allowed
where documented: the transport helpers and the Mailbox).  Each call is logged to LOG first,
so a crash names the call that crashed.  The same seed makes the same calls.
"""

from __future__ import annotations

import ctypes
import enum
import gc
import inspect
import json
import math
import multiprocessing as mp
import os
import random
import resource
import socket
import subprocess
import sys
import time
import traceback

import numpy as np
import posix_ipc
from numpy.lib.stride_tricks import sliding_window_view

import hipipc as hip

SEED, SECONDS, MAX_CALLS, LOG = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(SEED)
# A fuzzed size must never take the machine's memory from the other processes on it: cap
# this process's address space (a huge request then fails with ENOMEM, as it should).
_soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (min(8 << 30, _hard) if _hard > 0 else 8 << 30, _hard))
ALLOWED = (hip.HipError, TypeError, ValueError)
DOCUMENTED = (TimeoutError, EOFError)  # for the transport helpers and Mailbox methods
TRANSPORT = {
    "send_handle",
    "recv_handle",
    "Mailbox.attach",
    "Mailbox.put",
    "Mailbox.get",
    "Mailbox.poll",
    "Mailbox.wait",
    "Mailbox.clear",
    "send_fds",
    "recv_fds",
}

# A peer process that exports memory: its pointer values are foreign here, its handle opens.
EXPORTER = (
    "import sys, hipipc as hip\n"
    "p = hip.hipMalloc(4096)\n"
    "print(bytes(hip.hipIpcGetMemHandle(p)).hex(), p, flush=True)\n"
    "sys.stdin.readline()\n"
    "hip.hipFree(p)\n"
)
peer = subprocess.Popen(
    [sys.executable, "-c", EXPORTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
)
line = peer.stdout.readline().split()
foreign_handle, foreign_ptr = bytes.fromhex(line[0].decode()), int(line[1])

log_fd = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

# -- pools ---------------------------------------------------------------------------------

INTS = [
    0,
    1,
    7,
    63,
    64,
    65,
    255,
    256,
    4096,
    1 << 20,
    -1,
    -4096,
    -(2**31),
    2**63 - 1,
    2**63,
    2**64,
    2**64 + 1,
    2**100,
    -(2**63),
    2**40,
]
# No value between 64 MiB and 1 TiB, where any int may become a size: such a reservation
# would really be made and fill the shared tmpfs for every process on the machine (1 TiB is
# more than the tmpfs holds: refused at once).  32-bit edges go to ordinals only.
EDGES = [2**31 - 1, 2**31, 2**32 - 1, 2**32]
FLOATS = [
    0.0,
    -0.0,
    0.5,
    1.0,
    -1.0,
    math.nan,
    math.inf,
    -math.inf,
    1e300,
    -1e300,
    5e-324,
    9.3e9,
    2.0**63,
]
NUMPY = [
    np.int8(-1),
    np.uint8(255),
    np.int64(-(2**63)),
    np.uint64(2**64 - 1),
    np.float32("nan"),
    np.float64("inf"),
    np.float16(65504),
    np.bool_(True),
    np.complex64(1j),
    np.int32(4096),
]
STRINGS = [
    "",
    "x",
    "user",
    "group",
    "all",
    "/",
    "/hipipc-fuzz",
    "/a/b",
    "\x00",
    "a" * 300,
    "/" + "b" * 250,
    "0x10",
    "nan",
    "hipMemcpyDefault",
]
RELEASED = memoryview(bytes(64))
RELEASED.release()
OTHER = [
    None,
    True,
    False,
    RELEASED,
    [],
    [1, 2],
    {},
    (),
    (1, -1),
    object(),
    1j,
    slice(1),
    Ellipsis,
    b"",
    bytes(64),
    bytes(range(64)),
    bytearray(64),
    b"\xff" * 64,
    memoryview(b"q" * 64),
]
KINDS = list(hip.hipMemcpyKind) + [5, -1, 2**64]
TIMEOUTS_WAITS = [
    None,
    0,
    0.001,
    0.01,
    math.inf,
    1e300,
    10**400,
    9.3e9,
    np.float32(0.01),
    math.nan,
    -1,
    "1",
    True,
    b"",
    np.float64("nan"),
]
# Calls that wait for a peer get no unbounded timeout: nobody would ever answer them.
TIMEOUTS_TRANSPORT = [
    0,
    0.001,
    0.02,
    np.float32(0.01),
    math.nan,
    -1,
    -math.inf,
    "1",
    True,
    0.0,
    [],
    1j,
]


def host_buffers() -> list:
    return [
        bytearray(4096),
        np.zeros(4096, np.uint8),
        np.zeros(512, np.float64),
        bytes(4096),
        np.zeros(64, np.uint8)[::2],
        np.empty(16, dtype=object),
        np.zeros(4, dtype=[("n", "i8"), ("o", "O")]),
        (ctypes.py_object * 8)(),
        memoryview(bytearray(100)),
        np.zeros((8, 8), order="F"),
        (ctypes.c_char * 64)(),
    ] + hip_arrays()


def hip_arrays() -> list:
    """Buffers over hipipc memory: pinned (hipHostMalloc, live or freed), shared arrays of
    device memory and their views (strided, reversed, 0-d, windows, structured), and
    DeviceBuffer slices, so that the host-side calls see memory the runtime knows."""
    out: list = list(state["pinned"][-3:])
    if state["pinned"]:
        pinned = rng.choice(state["pinned"])
        out += [pinned[1:], pinned[::2], pinned[: pinned.size // 4 * 4].view(np.float32)[:3]]
    if state["buffers"]:
        buf = rng.choice(state["buffers"])
        try:
            n = buf.size
            out += [buf[rng.randrange(n + 1) : rng.randrange(n + 2)], buf[-1:], buf[7:7]]
            arr = buf.asarray(np.int32)
            if arr.size >= 64:
                out += [
                    arr,
                    arr[1:9],
                    arr[::-3],
                    arr[5:6].reshape(()),
                    arr[:64].reshape(-1, 4).T,
                    sliding_window_view(arr[:64], 8, subok=True),
                    buf.asarray(np.dtype([("x", "<i4"), ("y", "<f8")]))[1:3],
                ]
        except hip.HipError:
            pass  # closed by a fuzzed call: its arrays are gone too
    return out


state: dict[str, list] = {
    "live": [],
    "freed": [],
    "streams": [],
    "events": [],
    "handles": [],
    "buffers": [],
    "boxes": [],
    "queues": [],
    "imported": [],
    "views": [],
    "pinned": [],
}


def new_alloc() -> int:
    ptr = hip.hipMalloc(rng.choice([1, 64, 4096, 1 << 16]))
    state["live"].append(ptr)
    return ptr


def refill() -> None:
    while len(state["live"]) < 3:
        new_alloc()
    while len(state["streams"]) < 2:
        state["streams"].append(hip.hipStreamCreate())
    while len(state["events"]) < 3:
        flags = rng.choice(
            [0, hip.hipEventDisableTiming, hip.hipEventInterprocess | hip.hipEventDisableTiming]
        )
        state["events"].append(hip.hipEventCreateWithFlags(flags))
    if len(state["buffers"]) < 2:
        state["buffers"].append(hip.DeviceBuffer.allocate(4096))
    if len(state["boxes"]) < 1:
        state["boxes"].append(hip.Mailbox.create(slots=2, parties=rng.choice([1, 2])))
    if len(state["pinned"]) < 2:
        state["pinned"].append(hip.hipHostMalloc(rng.choice([1, 100, 4096, 8192])))


def pointers() -> list:
    live = state["live"]
    p = rng.choice(live) if live else 0
    out = [
        p,
        p + 1,
        p + 4095,
        p - 1,
        np.int64(p),
        np.uint64(p),
        foreign_ptr,
        0,
        -1,
        2**64,
        id(object()),
        np.zeros(8).ctypes.data,
    ]
    out += state["freed"][-3:] + state["imported"][-2:]
    if state["pinned"]:  # pinned memory's addresses: base, interior, one past the end
        arr = rng.choice(state["pinned"])
        base = arr.ctypes.data
        out += [base, base + arr.nbytes - 1, base + arr.nbytes]
    return out


def streams() -> list:
    s = state["streams"]
    return s + [None, 0, 1, -1, "stream", destroyed_stream]


def events() -> list:
    return state["events"] + [destroyed_event, None, 0, "event"]


def handles() -> list:
    out = list(state["handles"][-4:]) + [
        foreign_handle,
        bytearray(foreign_handle),
        memoryview(foreign_handle),
        foreign_handle[:63],
        foreign_handle + b"\0",
        bytes(64),
    ]
    flipped = bytearray(foreign_handle)
    flipped[rng.randrange(64)] ^= 1 << rng.randrange(8)
    out.append(bytes(flipped))
    return out


def channels() -> list:
    return [
        sock_a,
        sock_b,
        conn_r,
        conn_w,
        duplex_a,
        duplex_b,
        queue,
        *state["queues"][-2:],
        closed_conn,
        closed_sock,
        None,
        "channel",
        3,
    ]


def anything() -> object:
    pool = rng.choice(
        [
            INTS,
            FLOATS,
            NUMPY,
            STRINGS,
            OTHER,
            host_buffers(),
            pointers(),
            streams(),
            events(),
            handles(),
            channels(),
            KINDS,
        ]
    )
    return rng.choice(pool)


BY_NAME = {
    "ptr": lambda: pointers() + hip_arrays(),
    "buf": host_buffers,
    "dst": lambda: pointers() + host_buffers(),
    "src": lambda: pointers() + host_buffers(),
    "nbytes": lambda: INTS,
    "value": lambda: INTS + NUMPY,
    "kind": lambda: KINDS,
    "stream": streams,
    "event": events,
    "start": events,
    "stop": events,
    "handle": handles,
    "raw": handles,
    "data": handles,
    "obj": handles,
    "mem": handles,
    "channel": channels,
    "share": lambda: STRINGS + [None],
    "flags": lambda: INTS + [0, 1, 2, 4, 6],
    "device": lambda: [0, 1, -1, None, *EDGES],
    "shape": lambda: [1, 8, -1, (2, 2), (), 2**62, "ab", (1.5,)],
    "dtype": lambda: [np.uint8, np.float64, object, "O", "i4", None, "nonsense", "V0"],
    "name": lambda: STRINGS + [None],
    "slots": lambda: INTS,
    "parties": lambda: INTS,
    "slot": lambda: [0, 1, 2, -1, True, 2**70, *EDGES],
    "code": lambda: INTS + FLOATS + NUMPY,
    "fn": lambda: [lambda *a: None, lambda *a: 1 / 0, None, 3],
    "max_messages": lambda: [1, 8, 0, -1, 2**40, 10**30],
    "size": lambda: INTS,
    "uid": lambda: INTS + EDGES,
    "detail": lambda: STRINGS + [None, 1],
}


def value_for(name: str, qualname: str) -> object:
    if name == "timeout":
        pool = TIMEOUTS_TRANSPORT if qualname in TRANSPORT else TIMEOUTS_WAITS
        return rng.choice(pool)
    if name in BY_NAME and rng.random() < 0.7:
        return rng.choice(list(BY_NAME[name]()))
    return anything()


def arguments(fn, qualname: str) -> tuple[list, dict]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    args: list = []
    kwargs: dict = {}
    by_name = False  # once an optional positional is left out, the rest go by keyword
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            if not by_name:
                args += [anything() for _ in range(rng.randrange(3))]
        elif p.kind is p.VAR_KEYWORD:
            continue
        elif p.kind is p.KEYWORD_ONLY:
            if p.name == "timeout" or rng.random() < 0.5:
                kwargs[p.name] = value_for(p.name, qualname)
        elif p.default is p.empty or p.name == "timeout" or rng.random() < 0.6:
            if by_name:
                kwargs[p.name] = value_for(p.name, qualname)
            else:
                args.append(value_for(p.name, qualname))
        else:
            by_name = True
    if rng.random() < 0.03:
        args.append(anything())  # one too many
    return args, kwargs


def targets() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for name in hip.__all__:
        obj = getattr(hip, name)
        # An ndarray subclass's constructor is numpy's own (ndarray.__new__ and its errors);
        # its methods and the functions that make such arrays are fuzzed like the rest.
        if callable(obj) and not (inspect.isclass(obj) and issubclass(obj, np.ndarray)):
            out.append((name, obj))
        if inspect.isclass(obj):
            for attr, raw in vars(obj).items():
                if not attr.startswith("_") and isinstance(raw, (classmethod, staticmethod)):
                    out.append((f"{name}.{attr}", getattr(obj, attr)))
    return out


def instance_targets() -> list[tuple[str, object]]:
    out = []
    for kind, objs in (("DeviceBuffer", state["buffers"]), ("Mailbox", state["boxes"])):
        for obj in objs[-2:]:
            for attr in dir(type(obj)):
                if attr.startswith("_") or attr in (
                    "create",
                    "attach",
                    "allocate",
                    "open",
                    "from_handle",
                ):
                    continue
                if inspect.isfunction(inspect.getattr_static(obj, attr, None)):
                    out.append((f"{kind}.{attr}", getattr(obj, attr)))  # not properties
    return out


def adopt(result: object) -> None:
    """Keep what a call made, so later calls use it and the end cleans it up."""
    if isinstance(result, int) and not isinstance(result, bool):
        # Only pointers: an int a query returned (total memory, a free byte count) would
        # become a size somewhere, and a real 24 GiB allocation starves the machine.
        try:
            hip.hipMemGetAddressRange(result)
        except (hip.HipError, TypeError, ValueError):
            return
        state["live"].append(result)
    elif isinstance(result, hip.Stream) and not result.is_null:
        state["streams"].append(result)
    elif isinstance(result, hip.Event):
        state["events"].append(result)
    elif isinstance(result, hip.IpcHandle):
        state["handles"].append(result)
    elif isinstance(result, hip.DeviceBuffer):
        state["buffers"].append(result)
    elif isinstance(result, hip.Mailbox):
        state["boxes"].append(result)
    elif isinstance(result, posix_ipc.MessageQueue):
        state["queues"].append(result)
    elif (
        isinstance(result, np.ndarray)
        and result.dtype == np.uint8
        and result.ndim == 1
        and not isinstance(result, hip.SharedArray)
    ):
        state["pinned"].append(result)  # hipHostMalloc's array


def trim() -> None:
    """Free what the pools no longer need: pointers are freed through hipFree (the freed
    values stay in the pool as stale pointers)."""
    while len(state["live"]) > 12:
        ptr = state["live"].pop(0)
        try:
            hip.hipFree(ptr)
        except hip.HipError:
            try:
                hip.hipIpcCloseMemHandle(ptr)
            except hip.HipError:
                pass
        state["freed"].append(ptr)
    del state["freed"][:-8]
    while len(state["pinned"]) > 6:
        close(state["pinned"].pop(0))
    for key in ("streams", "events", "buffers", "boxes", "handles", "queues"):
        while len(state[key]) > 6:
            old = state[key].pop(0)
            close(old)


def close(obj: object) -> None:
    try:
        if isinstance(obj, hip.Stream):
            if not obj.destroyed:
                hip.hipStreamDestroy(obj)
        elif isinstance(obj, hip.Event):
            if not obj.destroyed:
                hip.hipEventDestroy(obj)
        elif isinstance(obj, (hip.DeviceBuffer, hip.Mailbox)):
            obj.close()
        elif isinstance(obj, posix_ipc.MessageQueue):
            posix_ipc.unlink_message_queue(obj.name)
            obj.close()
        elif isinstance(obj, np.ndarray):
            hip.hipHostFree(obj)  # freed already by a fuzzed call: refused, fine
    except (hip.HipError, posix_ipc.Error):
        pass


# Fixed channels, and destroyed objects that stay in the pools.
sock_a, sock_b = socket.socketpair()
sock_b.setblocking(False)
conn_r, conn_w = mp.Pipe(duplex=False)
duplex_a, duplex_b = mp.Pipe()
closed_conn, _other = mp.Pipe()
closed_conn.close()
closed_sock = socket.socket()
closed_sock.close()
queue = hip.create_handle_queue()
destroyed_stream = hip.hipStreamCreate()
hip.hipStreamDestroy(destroyed_stream)
destroyed_event = hip.hipEventCreate()
hip.hipEventDestroy(destroyed_event)

calls = 0
escapes: list[dict] = []
names_called: set[str] = set()
end = time.monotonic() + SECONDS
static = targets()
dynamic: list[tuple[str, object]] = []
try:
    while calls < MAX_CALLS and time.monotonic() < end and len(escapes) < 20:
        refill()
        if calls % 25 == 0:
            dynamic = instance_targets()
        name, fn = rng.choice(static + dynamic)
        args, kwargs = arguments(fn, name)
        if isinstance(fn, type) and issubclass(fn, enum.Enum):
            # Enum(value) is a lookup; Enum(name, members...) is Python's functional API for
            # making new enums, nothing of hipipc's.
            args, kwargs = [anything()], {}
        try:
            text = f"{calls} {name} {args!r:.300} {kwargs!r:.200}\n"
        except Exception:  # an object array of garbage pointers has no safe repr
            text = f"{calls} {name} <unprintable args>\n"
        os.write(log_fd, text.encode("utf-8", "replace"))
        calls += 1
        names_called.add(name)
        try:
            result = fn(*args, **kwargs)
        except ALLOWED:
            continue
        except DOCUMENTED as exc:
            if name in TRANSPORT:
                continue
            escapes.append(
                {"call": text.strip(), "exc": repr(exc), "tb": traceback.format_exc()[-1500:]}
            )
            continue
        except BaseException as exc:  # noqa: BLE001 - this is what the fuzzer looks for
            escapes.append(
                {"call": text.strip(), "exc": repr(exc), "tb": traceback.format_exc()[-1500:]}
            )
            continue
        adopt(result)
        trim()
finally:
    for key in ("boxes", "buffers", "streams", "events", "queues", "pinned"):
        for obj in state[key]:
            close(obj)
    for ptr in state["live"]:
        for release in (hip.hipFree, hip.hipIpcCloseMemHandle):
            try:
                release(ptr)
                break
            except hip.HipError:
                pass
    close(queue)
    try:
        hip.hipDeviceSynchronize(timeout=30)
    except hip.HipError:
        pass  # failures of fuzzed host functions
    peer.stdin.write(b"bye\n")
    peer.stdin.close()
    peer.wait(30)
    gc.collect()
missed = sorted({name for name, _ in static} - names_called)
print(
    json.dumps(
        {
            "seed": SEED,
            "calls": calls,
            "functions": len(names_called),
            "missed": missed,
            "escapes": escapes,
        }
    )
)
