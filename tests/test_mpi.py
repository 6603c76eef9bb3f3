"""hipipc.mpi under a real MPI launcher: ``mpiexec`` runs real ranks, as users run them.

Every job is a subprocess in its own session with a bounded timeout; a job that outlives it
is killed with its whole process group, and its ranks are checked gone.  Simulated nodes
(``HIPIPC_MPI_NODES``) give several nodes on one machine.  Skipped, with the reason, only when
mpi4py or an ``mpiexec`` is missing (``pip install -e ".[test]"`` installs both).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HALO = ROOT / "examples" / "mpi_halo.py"
TIMEOUT = 90  # seconds per job; each takes a few seconds on a loaded 2-core machine


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's, in this venv
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("mpi4py") is None,
        reason="mpi4py is not installed (pip install -e '.[test]' or '.[mpi]')",
    ),
    pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (pip install mpich)"),
]


def _launcher_flags() -> list[str]:
    """Open MPI refuses root and more ranks than cores unless told; MPICH needs nothing."""
    try:
        version = subprocess.run(
            [MPIEXEC, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    if "Open MPI" in version or "OpenRTE" in version:
        return ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return []


def store_names() -> set[str]:
    store = Path(os.environ["HIPIPC_STORE"].replace("{uid}", str(os.geteuid())))
    return set(os.listdir(store)) if store.is_dir() else set()


def mpirun(
    n: int,
    *args: str,
    nodes: int | None = None,
    timeout: float = TIMEOUT,
    env_extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``mpiexec -n N python ARGS`` with ``HIPIPC_MPI_NODES=nodes``; killed past ``timeout``."""
    env = dict(os.environ)  # HIPIPC_STORE: the suite's private store (conftest.py)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("HIPIPC_NODE_ID", None)
    env.pop("HIPIPC_MPI_NODES", None)
    if nodes is not None:
        env["HIPIPC_MPI_NODES"] = str(nodes)
    env.update(env_extra or {})
    cmd = [MPIEXEC, *_launcher_flags(), "-n", str(n), sys.executable, *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        pytest.fail(
            f"mpiexec -n {n} {' '.join(args)} (nodes={nodes}) did not finish in "
            f"{timeout} s: a deadlock?\n--- stdout\n{out}--- stderr\n{err}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def output(proc: subprocess.CompletedProcess) -> str:
    return f"exit code {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"


@pytest.fixture
def clean_store():
    """The job must leave nothing in the store."""
    before = store_names()
    yield
    left = store_names() - before
    assert not left, f"the MPI job left {len(left)} name(s) in the store"


# -- the example: equal to the pure-MPI reference, one open per on-node neighbour --------

REPORT = re.compile(
    r"rank (\d+): node (\d+), on-node neighbours \[([\d, ]*)\] "
    r"\(hipipc opens: (\d+)\), off-node neighbours \[([\d, ]*)\]"
)


def ranks_of(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@pytest.mark.parametrize(
    "n, nodes",
    [(4, 1), (4, 2), (4, 4), (2, 2), (3, None)],
    ids=[
        "4-ranks-1-node",
        "4-ranks-2-nodes",
        "4-ranks-4-nodes",
        "2-ranks-2-nodes",
        "3-ranks-shared-memory-split",
    ],
)
def test_halo_example_equals_the_reference(clean_store, n, nodes):
    # nodes == n: every neighbour is off-node (a blocking ring would deadlock); n == 2: the
    # left and right neighbour are the same rank; None: the real split by shared memory.
    proc = mpirun(n, str(HALO), "--points", "1200", "--iters", "60", nodes=nodes)
    assert proc.returncode == 0, output(proc)
    out = proc.stdout.splitlines()
    k = nodes or 1
    assert out[0] == f"mpi_halo: {n} ranks on {k} node(s), 1200 points, 60 steps", output(proc)
    assert out[-1] == "mpi_halo: PASSED (equal to the pure-MPI reference)", output(proc)
    reports = [REPORT.fullmatch(line) for line in out[1:-1]]
    assert all(reports) and len(reports) == n, output(proc)
    for m in reports:
        rank, node, on, opens, off = (
            int(m[1]),
            int(m[2]),
            ranks_of(m[3]),
            int(m[4]),
            ranks_of(m[5]),
        )
        node_of = [r * k // n for r in range(n)]  # contiguous blocks of ranks
        neighbours = {(rank - 1) % n, (rank + 1) % n}
        assert node == node_of[rank], output(proc)
        assert set(on) == {p for p in neighbours if node_of[p] == node} - {rank}, output(proc)
        assert set(off) == {p for p in neighbours if node_of[p] != node}, output(proc)
        assert opens == len(on), output(proc)  # one hipipc open per on-node peer, no more


PRIVATE_VIEWS = """
import runpy, sys
import hipipc.buffer
_asarray = hipipc.buffer.DeviceBuffer.asarray

def _private(self, *args, **kwargs):  # an import's view is a private copy: nothing shared
    view = _asarray(self, *args, **kwargs)
    return view if self.is_owner else view.copy()

hipipc.buffer.DeviceBuffer.asarray = _private
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_halo_example_fails_when_halos_are_not_shared(clean_store, tmp_path):
    """The example's own check can fail: with stale halos it no longer equals the reference."""
    wrapper = tmp_path / "private_views.py"
    wrapper.write_text(PRIVATE_VIEWS)
    proc = mpirun(4, str(wrapper), str(HALO), "--points", "400", "--iters", "20", nodes=2)
    assert proc.returncode == 1, output(proc)
    assert re.search(r"^mpi_halo: FAILED \(\d+ values differ", proc.stdout, re.M), output(proc)


# -- NodeComm's contract -----------------------------------------------------------------

API = r"""
import os, time
from mpi4py import MPI
import hipipc as hip
from hipipc.handle import node_tag
from hipipc.mpi import NodeComm
from hipipc.registry import get_registry

E = hip.hipError_t
IPC = hip.hipEventInterprocess | hip.hipEventDisableTiming
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
assert size == 4 and os.environ["HIPIPC_MPI_NODES"] == "2"


def refused(fn, code, text):
    try:
        fn()
    except hip.HipError as exc:
        assert exc.code == code and text in str(exc), (rank, exc.code, str(exc))
        return
    raise AssertionError(f"rank {rank}: no HipError({code.name}) from {fn}")


# A bad node count fails on every rank (nobody is left in a collective).
refused(lambda: NodeComm(comm, nodes=size + 1), E.hipErrorInvalidValue, "1..4")

with NodeComm(comm) as nc:
    mates = (0, 1) if rank < 2 else (2, 3)
    other = (rank + 2) % 4  # the same position on the other node
    assert nc.simulated == 2 and nc.num_nodes == 2 and nc.node_index == rank // 2
    assert nc.node_ranks == mates and nc.node.Get_size() == 2
    assert [nc.is_local(r) for r in range(4)] == [r in mates for r in range(4)]
    assert nc.is_leader == (rank == mates[0]) == (nc.leaders != MPI.COMM_NULL)
    if nc.is_leader:
        assert nc.leaders.Get_size() == 2
    refused(lambda: nc.is_local(4), E.hipErrorInvalidValue, "not a rank")
    tags = comm.allgather(node_tag())
    assert tags[0] == tags[1] != tags[2] == tags[3], tags
    assert os.environ["HIPIPC_NODE_ID"] == str(node_tag())

    # allocate_shared: sizes per rank, every other rank of the node opened once
    mine, peers = nc.allocate_shared(4096 * (rank + 1))
    assert list(peers) == [r for r in mates if r != rank]
    assert get_registry().live_counts() == (1, 1), get_registry().live_counts()
    mine.asarray()[:] = rank + 1
    nc.node.Barrier()
    for r, buf in peers.items():
        assert buf.size == 4096 * (r + 1) and (buf.asarray() == r + 1).all()

    # a peer on another node: refused on every rank of the node, nothing left behind
    bad = [other] if rank % 2 == 0 else None
    why = "runs on another node" if bad else f"failed on rank(s) [{mates[0]}]"
    refused(lambda: nc.allocate_shared(4096, peers=bad), E.hipErrorInvalidValue, why)
    assert get_registry().live_counts() == (1, 1)

    # exchange of an existing buffer; this rank maps to its own buffer
    extra = hip.DeviceBuffer.allocate(1024)
    extra.asarray()[:] = 100 + rank
    got = nc.exchange(extra, peers=mates)
    assert got[rank] is extra and list(got) == list(mates)
    assert all(int(b.asarray()[0]) == 100 + r for r, b in got.items())
    raw = hip.hipMalloc(256)  # a bare hipMalloc pointer works too
    hip.hipMemset(raw, rank + 1, 256)
    got_raw = nc.exchange(raw)
    assert [int(b.asarray()[0]) for b in got_raw.values()] == [r + 1 for r in got_raw]

    # exchange_events: the node's leader finishes slow work later; its mate waits on the
    # opened event, not on a barrier, before reading
    ev = hip.hipEventCreateWithFlags(IPC)
    events = nc.exchange_events(ev)
    stream = hip.hipStreamCreate()
    if nc.is_leader:
        view = mine.asarray()

        def slow_work():
            time.sleep(0.3)
            view[0] = 77

        hip.hipLaunchHostFunc(stream, slow_work)
        hip.hipEventRecord(ev, stream)
    nc.node.Barrier()  # the record happened; the work may not have
    if not nc.is_leader:
        hip.hipEventSynchronize(events[mates[0]], timeout=30)
        assert int(peers[mates[0]].asarray()[0]) == 77
    hip.hipStreamSynchronize(stream, timeout=30)
    hip.hipStreamDestroy(stream)

    # another node's handles are refused as such, never "names nothing"
    theirs = comm.sendrecv((bytes(mine.handle), bytes(hip.hipIpcGetEventHandle(ev))),
                           dest=other, source=other)
    refused(lambda: hip.DeviceBuffer.open(theirs[0]), E.hipErrorInvalidResourceHandle,
            "exported on another node")
    refused(lambda: hip.hipIpcOpenEventHandle(theirs[1]), E.hipErrorInvalidResourceHandle,
            "exported on another node")
    comm.Barrier()  # the other node keeps its memory until we tried

nc.close()  # idempotent
assert nc.closed
hip.hipEventDestroy(ev)
extra.close()
hip.hipFree(raw)
assert get_registry().live_counts() == (0, 0)
refused(lambda: nc.exchange(extra), E.hipErrorInvalidValue, "closed")

# A block that raises closes without collectives (others may never arrive): no hang, and
# everything of this rank is closed and freed.
try:
    with NodeComm(comm) as nc2:
        nc2.allocate_shared(4096)
        raise KeyError("boom")
except KeyError:
    pass
assert nc2.closed and get_registry().live_counts() == (0, 0)

# The node tag is fixed now: other simulated nodes are refused on every rank (rank 0 keeps
# its tag under 4 nodes, and still raises, naming the others).
refused(lambda: NodeComm(comm, nodes=4), E.hipErrorInvalidContext,
        "set-up failed on rank(s) [1, 2, 3]" if rank == 0 else "fixed its node tag")
comm.Barrier()
if rank == 0:
    print("API OK", flush=True)
"""


def test_node_comm_contract(clean_store, tmp_path):
    script = tmp_path / "api.py"
    script.write_text(API)
    # -m mpi4py: an uncaught exception on one rank aborts the job instead of hanging it.
    proc = mpirun(4, "-m", "mpi4py", str(script), nodes=2)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("API OK"), output(proc)


SETUP_ERRORS = r"""
import os
from mpi4py import MPI
import hipipc as hip
from hipipc.handle import node_tag
from hipipc.mpi import NodeComm

E = hip.hipError_t
comm = MPI.COMM_WORLD
rank = comm.Get_rank()


def refused(code, text):
    try:
        NodeComm(comm)
    except hip.HipError as exc:
        assert exc.code == code and text in str(exc), (rank, exc.code, str(exc))
        return
    raise AssertionError(f"rank {rank}: NodeComm did not raise")


# A bad HIPIPC_NODE_ID on rank 1 only: every rank raises, none waits in a collective.
if rank == 1:
    os.environ["HIPIPC_NODE_ID"] = "0"
refused(E.hipErrorInvalidValue, "HIPIPC_NODE_ID" if rank == 1 else "set-up failed on rank(s) [1]")
# Rank 1 on a node of its own making, rank 0 on the machine's: the ranks of one node disagree.
theirs = comm.bcast(node_tag() if rank == 0 else None)
if rank == 1:
    os.environ["HIPIPC_NODE_ID"] = str(theirs % 0xFFFF + 1)
refused(E.hipErrorInvalidResourceHandle, "different node tags")
comm.Barrier()
if rank == 0:
    print("SETUP OK", flush=True)
"""


def test_node_comm_setup_errors_raise_on_every_rank(clean_store, tmp_path):
    script = tmp_path / "setup_errors.py"
    script.write_text(SETUP_ERRORS)
    proc = mpirun(2, "-m", "mpi4py", str(script))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("SETUP OK"), output(proc)


def test_hipipc_mpi_is_opt_in():
    # The base package never imports mpi4py: it works where mpi4py is absent.
    code = "import sys, hipipc; assert 'mpi4py' not in sys.modules; print('ok')"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# -- a rank killed with SIGKILL -----------------------------------------------------------

KILLED = """
import os, signal
from mpi4py import MPI
from hipipc.mpi import NodeComm

comm = MPI.COMM_WORLD
nc = NodeComm(comm)
mine, peers = nc.allocate_shared(1 << 20)
os.write(1, f"pid {os.getpid()}\\n".encode())  # one write: ranks cannot interleave it
comm.Barrier()
if comm.Get_rank() == 1:
    os.kill(os.getpid(), signal.SIGKILL)
nc.node.Barrier()  # never completes: the launcher ends the job
"""


def gc() -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hipipc", "gc"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_a_rank_killed_with_sigkill_leaves_only_what_gc_cleans(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    before = store_names()
    mpich_before = set(glob.glob("/dev/shm/mpich_shm_*"))
    proc = mpirun(3, str(script), nodes=1)
    assert proc.returncode != 0, output(proc)
    pids = [int(p) for p in re.findall(r"pid (\d+)\n", proc.stdout)]
    assert len(pids) == 3, output(proc)
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in pids):
        assert time.monotonic() < deadline, "ranks outlived their job"
        time.sleep(0.05)
    left = store_names() - before
    assert left, "the killed rank's export should still be named (the test checks gc)"
    done = gc()
    assert done.returncode == 0, done.stderr
    assert store_names() - before == set(), done.stdout
    # MPICH's own segment of a job whose rank was killed stays in /dev/shm (its launcher
    # does not unlink it); the job is over, so remove what it left.
    for path in set(glob.glob("/dev/shm/mpich_shm_*")) - mpich_before:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    fields = data[data.rindex(b")") + 2 :].split()
    # A leader shows "Z" while its other threads still exit (field 20, num_threads > 1).
    return fields[0] in (b"Z", b"X") and fields[17] == b"1"


def test_mpi_launch_flags_are_documented():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Beyond one node") :]
    assert "--allow-run-as-root" in section and "--oversubscribe" in section
    assert 'pip install "hipipc[mpi]"' in section
