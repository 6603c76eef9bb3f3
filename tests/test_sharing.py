"""Issue 11 sections 2-4: sent buffers stay alive until received, views travel with offset,
shape, strides and dtype, events travel too.  Real processes (spawn, and fork where it
applies), kill -9 at every step of the send-and-drop protocol, and an empty store after each
test (after gc where no exit hook can run).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _proc import child_env, readline, store_names

import hipipc as hip
from hipipc.arrays import SharedArray, is_shared
from hipipc.store import HandleStore

E = hip.hipError_t
FLAGS = hip.hipEventInterprocess | hip.hipEventDisableTiming
TIMEOUT = 120


@pytest.fixture(autouse=True)
def store_left_as_found():
    before = store_names()
    yield
    gc.collect()
    assert store_names() - before == set()


def code_of(fn, *args):
    try:
        fn(*args)
    except hip.HipError as exc:
        return exc.code, str(exc)
    return None, ""


# -- send-and-drop: q.put(buf); del buf --------------------------------------------------


def _receive_and_check(q, out) -> None:
    """A receiver: every item must arrive open with the sender's bytes; reports a summary."""
    got = []
    while True:
        item = q.get(timeout=TIMEOUT)
        if item is None:
            break
        kind, obj, expect = item
        if kind == "buffer":
            got.append(bool(np.all(obj.asarray() == expect)) and not obj.is_owner)
        elif kind == "array":
            got.append(isinstance(obj, SharedArray) and bool(np.all(obj == expect)))
            obj[...] = expect + 1  # seen by the sender, if it still looks
        else:
            got.append(hip.hipEventQuery(obj) == E.hipSuccess)
        del obj
    out.put(got)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_put_then_drop_buffers_arrays_and_events(method):
    """torch's send_and_delete_tensors: the sender drops each object right after put."""
    ctx = mp.get_context(method)
    q, out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receive_and_check, args=(q, out))
    proc.start()
    try:
        for i in range(5):
            buf = hip.DeviceBuffer.allocate(1000 + i)
            buf.asarray()[:] = i
            q.put(("buffer", buf, i))
            del buf
            arr = hip.DeviceBuffer.allocate(64).asarray(np.int32)
            arr[:] = i
            q.put(("array", arr[2:10], i))
            del arr
            ev = hip.hipEventCreateWithFlags(FLAGS)
            hip.hipEventRecord(ev)
            # A null-stream record is asynchronous: without this wait a quick receiver could
            # query it before the null stream ran it (seen once the cold open got faster).
            hip.hipEventSynchronize(ev, timeout=TIMEOUT)
            q.put(("event", ev, None))
            del ev
            gc.collect()
        q.put(None)
        assert out.get(timeout=TIMEOUT) == [True] * 15
        proc.join(TIMEOUT)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(30)
    # Every object was dropped by both sides: nothing is left in the store (the fixture).


SENDER_LOOP = """
import gc, sys
import numpy as np
import hipipc as hip
from multiprocessing.connection import Connection
import os
conn = Connection(int(sys.argv[1]))
n = int(sys.argv[2])
for i in range(n):
    buf = hip.DeviceBuffer.allocate(256)
    buf.asarray()[:] = i % 251
    conn.send((i, buf))
    del buf  # dropped at once: only the ticket keeps it until the receiver opens it
conn.send(None)
conn.recv()  # the receiver's last word, then a normal exit
"""


def test_a_loop_sending_and_dropping_ten_thousand_buffers_stays_bounded():
    n = 10_000
    parent, child = mp.Pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SENDER_LOOP), str(child.fileno()), str(n)],
        env=child_env(),
        pass_fds=(child.fileno(),),
        stderr=subprocess.PIPE,
    )
    child.close()
    peak = 0
    try:
        bad = 0
        for i in range(n):
            assert parent.poll(TIMEOUT), f"no buffer {i} in {TIMEOUT} s"
            j, buf = parent.recv()
            bad += j != i or buf.is_owner or buf.asarray()[255] != i % 251
            del buf
            if i % 500 == 0:
                peak = max(peak, len(store_names()))
        assert parent.recv() is None
        assert bad == 0
        parent.send("done")
        assert proc.wait(TIMEOUT) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()
        parent.close()
    # In flight at most what the pipe holds (a few hundred 100-byte pickles), never n.
    assert peak < 1000, peak


# Each step of the protocol, with a kill -9 in it.  The sender pickles a buffer (a ticket is
# linked), prints the pickle, drops its buffer, then waits for a line: "exit" ends it normally,
# "kill" kills it with SIGKILL.
SENDER = """
import os, pickle, sys
import hipipc as hip
import hipipc.registry
# Its receivers open while it lives or never: its exit need not wait out the 2 s grace.
hipipc.registry.TICKET_GRACE = 0.1
buf = hip.DeviceBuffer.allocate(4096)
buf.asarray()[:] = 42
data = pickle.dumps(buf[100:200])
del buf
print(data.hex(), flush=True)
if sys.stdin.readline().strip() == "kill":
    os.kill(os.getpid(), 9)
"""


def start_sender() -> tuple[subprocess.Popen, bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SENDER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    try:
        data = bytes.fromhex(readline(proc.stdout, 60, "sender").strip())
    except BaseException:
        proc.kill()
        proc.wait(30)
        raise
    return proc, data


def end_sender(proc: subprocess.Popen, how: str) -> None:
    proc.communicate(f"{how}\n".encode(), timeout=60)
    assert proc.returncode == (-9 if how == "kill" else 0)


RECEIVER = """
import pickle, sys
import hipipc as hip
view = pickle.loads(bytes.fromhex(sys.argv[1]))
ok = view.size == 100 and view.offset == 100 and (view.asarray() == 42).all()
print("ok" if ok else "bad", flush=True)
sys.stdin.readline()
"""


def test_sender_alive_receiver_opens_after_the_sender_dropped():
    proc, data = start_sender()
    try:
        assert len(store_names()) == 1  # the ticket: the main name was revoked at the drop
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(RECEIVER), data.hex()],
            input=b"\n",
            capture_output=True,
            timeout=60,
            env=child_env(),
        )
        assert out.stdout.decode().strip() == "ok", out.stderr.decode()
        assert store_names() == set()  # consumed; the receiver's exit unmapped the rest
    finally:
        end_sender(proc, "exit")


def test_sender_killed_before_the_receiver_opens():
    proc, data = start_sender()
    end_sender(proc, "kill")
    assert len(store_names()) == 1  # the ticket outlived its sender: nothing ran at exit
    code, msg = code_of(pickle.loads, data)
    assert code == E.hipErrorInvalidResourceHandle and "without freeing" in msg, msg
    assert store_names() == set()  # the refused open reclaimed it


def test_sender_exits_normally_before_the_receiver_opens():
    proc, data = start_sender()
    end_sender(proc, "exit")
    assert store_names() == set()  # the exit rule removed the unconsumed ticket
    code, msg = code_of(pickle.loads, data)
    assert code == E.hipErrorInvalidResourceHandle, msg


@pytest.mark.parametrize("sender_end", ["exit", "kill"])
def test_receiver_killed_before_it_opens(sender_end):
    proc, data = start_sender()
    try:
        receiver = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            env=child_env(),
        )
        receiver.kill()  # it got the pickle (argv would do) and died before opening it
        receiver.wait(30)
        receiver.stdin.close()
        assert len(store_names()) == 1
    finally:
        end_sender(proc, sender_end)
    if sender_end == "kill":
        # Nobody is left to run an exit rule or an open: gc sweeps the dead sender's ticket.
        assert len(store_names()) == 1
        assert len(HandleStore().collect()) == 1
    assert store_names() == set()


def test_receiver_killed_after_it_opened():
    proc, data = start_sender()
    try:
        rec = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(RECEIVER), data.hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        assert readline(rec.stdout, 60, "receiver").strip() == "ok"
        assert store_names() == set()  # consumed: only the receiver's mapping holds it
        rec.kill()
        rec.wait(30)
        rec.stdin.close()
        rec.stdout.close()
    finally:
        end_sender(proc, "exit")


def test_close_keeps_immediate_revocation_for_raw_handles():
    buf = hip.DeviceBuffer.allocate(64)
    raw = bytes(buf.handle)
    data = pickle.dumps(buf)
    buf.close()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import pickle, sys
        import hipipc as hip
        try:
            hip.hipIpcOpenMemHandle(bytes.fromhex(sys.argv[1]))
        except hip.HipError as exc:
            print(exc.code.value)
        b = pickle.loads(bytes.fromhex(sys.argv[2]))
        print(b.size)
        """),
            raw.hex(),
            data.hex(),
        ],
        capture_output=True,
        timeout=60,
        env=child_env(),
    )
    assert out.stdout.decode().split() == ["400", "64"], out.stderr.decode()


# -- views -----------------------------------------------------------------------------


def test_buffer_slices_are_views_that_share_the_lifetime():
    buf = hip.DeviceBuffer.allocate(16)
    buf.asarray()[:] = np.arange(16)
    view = buf[3:9]
    assert (view.size, view.offset, view.ptr) == (6, 3, buf.ptr + 3)
    assert list(view.asarray()) == [3, 4, 5, 6, 7, 8]
    assert view[1:3].offset == 4 and list(view[1:3].asarray()) == [4, 5]
    assert view.handle == buf.handle and not view.is_owner
    assert buf[20:30].size == 0 and buf[9:3].size == 0
    with pytest.raises(TypeError):
        buf[::2]
    with pytest.raises(TypeError):
        buf[3]
    del buf
    gc.collect()
    assert list(view.asarray()) == [3, 4, 5, 6, 7, 8]  # the view keeps the allocation
    view.close()
    assert view.closed


def test_a_view_is_closed_with_its_buffer():
    buf = hip.DeviceBuffer.allocate(16)
    view = buf[2:4]
    buf.close()
    assert view.closed
    with pytest.raises(hip.HipError):
        _ = view.ptr


def _check_views(items) -> list:
    """In a child: each (array, expected values, expected strides) arrives as a zero-copy
    SharedArray of the same layout; it is negated in place for the parent to see."""
    out = []
    for arr, expect, strides in items:
        out.append(
            isinstance(arr, SharedArray)
            and arr.strides == strides
            and arr.dtype == expect.dtype
            and np.array_equal(arr, expect)
        )
        arr[...] = -arr
    return out


VIEWS = [
    lambda x: x,
    lambda x: x[:, 1],
    lambda x: x.T,
    lambda x: x[1:3, ::2],
    lambda x: x[::-1, ::-3],
    lambda x: x.reshape(6, 4)[2:],
    lambda x: x.view(np.int32)[1],
    lambda x: x[2:, 3:].view(np.uint8)[:, ::4],
]


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_strided_views_travel_with_offset_shape_strides_and_dtype(method):
    buf = hip.DeviceBuffer.allocate(4 * 6 * 4)
    x = buf.asarray(np.float32, (4, 6))
    x[:] = np.arange(24, dtype=np.float32).reshape(4, 6) + 1
    ref = x.copy().view(np.ndarray)  # private memory, changed the same way as x
    ctx = mp.get_context(method)
    got = []
    with ctx.Pool(1) as pool:
        for make in VIEWS:
            view = make(x)
            assert is_shared(view)
            got += pool.apply_async(_check_views, ([(view, view.copy(), view.strides)],)).get(
                TIMEOUT
            )
            r = make(ref)
            r[...] = -r  # what the child did to the shared bytes
    assert got == [True] * len(VIEWS)
    assert np.array_equal(x, ref)  # every in-place write arrived, at the right place
    buf.close()


def test_a_slice_arrives_with_its_offset_not_the_base():
    """The naive port of numba's slice test read [0..6] instead of [3..9]."""
    buf = hip.DeviceBuffer.allocate(16)
    buf.asarray()[:] = np.arange(16)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import pickle, sys
        b, a = pickle.loads(bytes.fromhex(sys.argv[1]))
        print(b.asarray().tolist(), a.tolist(), a.strides)
        a[0] = 99
        """),
            pickle.dumps((buf[3:9], buf.asarray(np.uint8)[3:9:2])).hex(),
        ],
        capture_output=True,
        timeout=60,
        env=child_env(),
    )
    assert out.stdout.decode().strip() == "[3, 4, 5, 6, 7, 8] [3, 5, 7] (2,)", out.stderr
    assert buf.asarray()[3] == 99
    buf.close()


def test_arrays_not_backed_by_hipipc_memory_pickle_as_numpy_does():
    buf = hip.DeviceBuffer.allocate(64)
    x = buf.asarray(np.int16)
    x[:] = 3
    for private in (x + 1, x.copy(), np.sort(x), x.reshape(4, 8)[:, :3].reshape(-1)):
        assert isinstance(private, SharedArray) and not is_shared(private)
        back = pickle.loads(pickle.dumps(private))
        assert type(back) is np.ndarray and np.array_equal(back, private)
    assert is_shared(x) and is_shared(x[::3])
    back = pickle.loads(pickle.dumps(x[::3], protocol=5))  # in-process: the same memory
    back[0] = 7
    assert x[0] == 7
    del back
    buf.close()
    assert not is_shared(x)  # freed since: the view cannot be shared any more
    with pytest.raises(hip.HipError) as exc:
        pickle.dumps(x)
    assert exc.value.code == E.hipErrorInvalidValue and "freed" in str(exc.value)


def test_empty_buffers_and_arrays_can_be_sent():
    empty = hip.DeviceBuffer.allocate(0)
    buf = hip.DeviceBuffer.allocate(8)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import pickle, sys
        e, v, a = pickle.loads(bytes.fromhex(sys.argv[1]))
        print(e.size, v.size, a.shape, a.dtype, len(e.asarray()))
        """),
            pickle.dumps((empty, buf[4:4], buf.asarray(np.float64)[1:1])).hex(),
        ],
        capture_output=True,
        timeout=60,
        env=child_env(),
    )
    assert out.stdout.decode().split() == ["0", "0", "(0,)", "float64", "0"], out.stderr
    assert empty.ptr == 0 and not empty.closed
    empty.close()
    buf.close()


# -- events ----------------------------------------------------------------------------


def _wait_on(ev, conn) -> None:
    conn.send(hip.hipEventQuery(ev) == E.hipSuccess)
    hip.hipEventSynchronize(ev)
    conn.send(ev.interprocess)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_an_interprocess_event_arrives_opened(method, gate):
    ctx = mp.get_context(method)
    ev = hip.hipEventCreateWithFlags(FLAGS)
    stream = hip.hipStreamCreate()
    hold = gate()
    hip.hipLaunchHostFunc(stream, hold.wait, 60)
    hip.hipEventRecord(ev, stream)
    assert pickle.loads(pickle.dumps(ev)) is ev  # in its own process: the same event
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_wait_on, args=(ev, child))
    proc.start()
    try:
        assert parent.poll(TIMEOUT) and parent.recv() is False  # not ready: the gate holds it
        hold.set()
        assert parent.poll(TIMEOUT) and parent.recv() is True
        proc.join(TIMEOUT)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(30)
        hip.hipStreamDestroy(stream)
        hip.hipEventDestroy(ev)


def test_local_events_and_streams_refuse_pickling_and_say_what_to_send():
    ev = hip.hipEventCreate()
    with pytest.raises(TypeError, match="hipEventInterprocess"):
        pickle.dumps(ev)
    s = hip.hipStreamCreate()
    try:
        with pytest.raises(TypeError, match="interprocess event"):
            pickle.dumps(s)
    finally:
        hip.hipStreamDestroy(s)
    dead = hip.hipEventCreateWithFlags(FLAGS)
    hip.hipEventDestroy(dead)
    with pytest.raises(hip.HipError):
        pickle.dumps(dead)


def test_a_sent_event_survives_its_creator_dropping_it():
    ev = hip.hipEventCreateWithFlags(FLAGS)
    data = pickle.dumps(ev)
    del ev
    gc.collect()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import pickle, sys
        import hipipc as hip
        ev = pickle.loads(bytes.fromhex(sys.argv[1]))
        print(hip.hipEventQuery(ev).name)
        """),
            data.hex(),
        ],
        capture_output=True,
        timeout=60,
        env=child_env(),
    )
    assert out.stdout.decode().strip() == "hipSuccess", out.stderr.decode()
    # The ticket was consumed and both sides dropped the event: the fixture finds nothing.
