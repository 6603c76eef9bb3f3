"""Beyond one node: hipipc among the ranks of a node, MPI between nodes.

MPI launches the ranks, tells which share a node, moves data between nodes and runs the
collectives; hipipc adds what MPI's shared windows lack inside a node: per-peer buffers on any
device, IPC events, and hipipc's lifetime and security rules.  Opt in with ``import
hipipc.mpi`` (extra ``hipipc[mpi]``: mpi4py >= 4 and an MPI runtime wheel such as ``mpich``);
the base package never imports mpi4py.

:class:`NodeComm` splits a communicator by node and exchanges 64-byte handles inside each node
with ``Allgather`` of ``uint8`` rows (no pickling).  Every method that exchanges is collective
on the node: each rank of the node calls it, in the same order.  A local failure (allocation,
open) is agreed on by all ranks of the node before anyone raises, so one rank's error never
leaves the others waiting in the next collective: they all raise ``HipError``, the failing rank
its own, the others one naming it.

Simulated nodes (tests, CI, laptops): ``HIPIPC_MPI_NODES=k`` (or ``NodeComm(comm, nodes=k)``)
splits the ranks into k contiguous blocks instead of by shared memory, and gives each block its
own node tag (:func:`hipipc.handle.set_node_tag`, inherited by child processes through
``$HIPIPC_NODE_ID``), so a handle that leaks to another simulated node is refused exactly as one
from another machine is.  The tag is fixed at a process's first handle: create the
``NodeComm`` before the first ``hipMalloc``, IPC event or open.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

try:
    import mpi4py
    from mpi4py import MPI
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hipipc.mpi needs mpi4py >= 4 and an MPI runtime: "
        "pip install 'hipipc[mpi]' (mpi4py and the mpich wheel)"
    ) from _exc

from . import runtime
from .buffer import DeviceBuffer
from .errors import HipError, hipError_t
from .events import Event
from .handle import HANDLE_SIZE, machine_tag, node_tag, set_node_tag

if int(mpi4py.__version__.split(".")[0]) < 4:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"hipipc.mpi needs mpi4py >= 4, found {mpi4py.__version__}: pip install -U 'hipipc[mpi]'"
    )

__all__ = ["NodeComm", "NODES_ENV", "simulated_nodes"]

NODES_ENV = "HIPIPC_MPI_NODES"


def simulated_nodes(size: int, nodes: int | None = None) -> int | None:
    """The number of simulated nodes for a communicator of ``size`` ranks: ``nodes`` if
    given, else ``$HIPIPC_MPI_NODES``, else None (split by shared memory).  Raises
    ``hipErrorInvalidValue`` for anything but an integer in 1..size."""
    value: Any = nodes
    if value is None:
        raw = os.environ.get(NODES_ENV, "").strip()
        if not raw:
            return None
        value = raw
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if isinstance(value, bool) or not 1 <= k <= size:
        raise HipError(
            hipError_t.hipErrorInvalidValue,
            f"simulated nodes ({NODES_ENV} or nodes=) must be an integer in "
            f"1..{size} (the communicator's size), got {value!r}",
        )
    return k


def _simulated_tag(index: int) -> int:
    # Distinct for every simulated node and different from the machine's own tag, so that a
    # process outside the job (no NodeComm) is "another node" too.
    return (machine_tag() + index) % 0xFFFF + 1


def _row_of(handle: Any) -> np.ndarray:
    return np.frombuffer(bytes(handle), dtype=np.uint8)


class NodeComm:
    """``comm`` split by node: hipipc buffers and events among the ranks of a node.

    Collective on ``comm`` at construction (``Split_type(COMM_TYPE_SHARED)``, or a split by
    rank blocks with simulated nodes) and at :meth:`close`; :meth:`allocate_shared`,
    :meth:`exchange` and :meth:`exchange_events` are collective on the node.  Ranks are
    always ``comm``'s ranks.

    Raises ``hipErrorInvalidValue`` for a bad ``nodes``/``$HIPIPC_MPI_NODES``,
    ``hipErrorInvalidContext`` when simulated nodes are asked for after this process already
    fixed its node tag, and ``hipErrorInvalidResourceHandle`` when the ranks of one node
    disagree on their node tag (``$HIPIPC_NODE_ID`` set for some of them only) -- on every
    rank of ``comm`` alike.
    """

    def __init__(self, comm: Any = None, *, nodes: int | None = None) -> None:
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self._owned: list[DeviceBuffer] = []
        self._imported: list[DeviceBuffer] = []
        self._events: list[Event] = []
        self._closed = False
        error: HipError | None = None
        try:
            self.simulated = simulated_nodes(self.size, nodes)
        except HipError as exc:
            self.simulated, error = None, exc
        if self.simulated:
            color = self.rank * self.simulated // self.size  # contiguous blocks of ranks
            self.node = self.comm.Split(color, self.rank)
            if error is None:
                try:
                    set_node_tag(_simulated_tag(color))
                except HipError as exc:
                    error = exc
        else:
            self.node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, self.rank)
        try:
            # Where every rank lives (its node's first rank) and with which tag, agreed on
            # comm-wide in one collective that also carries each rank's set-up error.
            # Every rank takes part in every collective here, failed or not.
            tag = 0
            if error is None:
                try:
                    tag = node_tag()  # fixes this process's tag (a bad $HIPIPC_NODE_ID fails)
                except HipError as exc:
                    error = exc
            first = np.zeros(1, dtype=np.int64)
            self.node.Allreduce(np.array([self.rank], dtype=np.int64), first, MPI.MIN)
            mine = np.array([int(error.code) if error else 0, first[0], tag], dtype=np.int64)
            table = np.zeros((self.size, 3), dtype=np.int64)
            self.comm.Allgather(mine, table)
            failed = [r for r in range(self.size) if table[r, 0]]
            if failed:
                raise error or HipError(
                    int(table[failed[0], 0]), f"NodeComm: set-up failed on rank(s) {failed}"
                )
            self._node_of = table[:, 1].copy()
            self.node_ranks: tuple[int, ...] = tuple(
                int(r) for r in np.flatnonzero(self._node_of == self._node_of[self.rank])
            )
            # Every rank checks every node, so all of comm raise alike (no rank is left
            # waiting in the next collective).
            for leader in sorted(set(self._node_of.tolist())):
                tags = {int(t) for t in table[self._node_of == leader, 2]}
                if len(tags) != 1:
                    raise HipError(
                        hipError_t.hipErrorInvalidResourceHandle,
                        f"the ranks of the node of rank {leader} have different "
                        f"node tags {sorted(hex(t) for t in tags)}: set "
                        "$HIPIPC_NODE_ID for every rank of a node alike, or for "
                        "none",
                    )
            leaders_of = sorted(set(self._node_of.tolist()))
            self.num_nodes: int = len(leaders_of)
            self.node_index: int = leaders_of.index(int(self._node_of[self.rank]))
            self.leaders = self.comm.Split(
                0 if self.node.Get_rank() == 0 else MPI.UNDEFINED, self.rank
            )
        except BaseException:
            self.node.Free()
            raise

    # -- where ranks live ----------------------------------------------------------------

    def is_local(self, rank: int) -> bool:
        """Whether ``rank`` (of ``comm``) runs on this rank's node (itself included)."""
        if (
            isinstance(rank, bool)
            or not isinstance(rank, (int, np.integer))
            or not 0 <= rank < self.size
        ):
            raise HipError(
                hipError_t.hipErrorInvalidValue,
                f"rank {rank!r} is not a rank of the communicator (0..{self.size - 1})",
            )
        return bool(self._node_of[rank] == self._node_of[self.rank])

    @property
    def is_leader(self) -> bool:
        """Whether this rank is its node's first rank (a member of :attr:`leaders`)."""
        return self.node_ranks[0] == self.rank

    # -- exchanges -----------------------------------------------------------------------

    def _wanted(self, peers: Iterable[int] | None) -> list[int]:
        if peers is None:
            return [r for r in self.node_ranks if r != self.rank]
        wanted: list[int] = []
        for r in peers:
            if not self.is_local(r):
                raise HipError(
                    hipError_t.hipErrorInvalidValue,
                    f"rank {r} runs on another node (node of rank "
                    f"{int(self._node_of[r])}); exchange with it through MPI "
                    "(Isend/Irecv), or test is_local(rank) first",
                )
            if int(r) not in wanted:
                wanted.append(int(r))
        return wanted

    def _agree(self, error: BaseException | None, what: str) -> None:
        """Collective on the node: raise on every rank if ``what`` failed on any."""
        codes = np.zeros(self.node.Get_size(), dtype=np.int32)
        code = 0
        if error is not None:
            code = (
                int(error.code) if isinstance(error, HipError) else int(hipError_t.hipErrorUnknown)
            )
        self.node.Allgather(np.array([code], dtype=np.int32), codes)
        failed = [self.node_ranks[i] for i in np.flatnonzero(codes)]
        if error is not None:
            raise error
        if failed:
            raise HipError(
                int(codes[self.node_ranks.index(failed[0])]),
                f"{what} failed on rank(s) {failed} of this node (see their error)",
            )

    def _share(
        self,
        handle: Any,
        error: BaseException | None,
        peers: Iterable[int] | None,
        open_one: Callable[[bytes], Any],
        close_one: Callable[[Any], None],
        what: str,
        own: Any = None,
    ) -> dict[int, Any]:
        """Allgather this rank's handle on the node, open the wanted peers' handles.

        Returns ``{rank: opened}`` sorted by rank, with ``own`` for this rank if it was asked
        for; the caller records the opened objects (not ``own``) for :meth:`close`.
        """
        wanted: list[int] = []
        if error is None:
            try:
                wanted = self._wanted(peers)
            except Exception as exc:  # a bad rank, or peers that are not an iterable
                error = exc
        mine = _row_of(handle) if error is None else np.zeros(HANDLE_SIZE, dtype=np.uint8)
        table = np.zeros((self.node.Get_size(), HANDLE_SIZE), dtype=np.uint8)
        self.node.Allgather(mine, table)
        self._agree(error, what)
        opened: dict[int, Any] = {}
        try:
            for r in wanted:
                if r != self.rank:
                    opened[r] = open_one(table[self.node_ranks.index(r)].tobytes())
        except BaseException as exc:
            error = exc
        # Also the point after which every peer has opened: the exporter may free from here.
        try:
            self._agree(error, what)
        except BaseException:
            for obj in opened.values():
                try:
                    close_one(obj)
                except HipError:
                    pass  # the first error is the one to report
            raise
        if self.rank in wanted:
            opened[self.rank] = own
        return dict(sorted(opened.items()))

    def _record(self, opened: dict[int, Any], into: list[Any]) -> None:
        into.extend(obj for r, obj in opened.items() if r != self.rank)

    def allocate_shared(
        self, nbytes: int, peers: Iterable[int] | None = None, *, device: int | None = None
    ) -> tuple[DeviceBuffer, dict[int, DeviceBuffer]]:
        """Allocate ``nbytes`` on ``device`` here, and open the on-node peers' allocations.

        Collective on the node (each rank may ask for its own size, as with
        ``MPI.Win.Allocate_shared``).  ``peers``: the ranks (of ``comm``, all on this node)
        whose buffers this rank opens; default every other rank of the node; this rank itself
        maps to its own buffer.  Returns ``(mine, {rank: buffer})``.  The buffers live until
        :meth:`close` (importers close, a node barrier, then owners free: CUDA's rule).
        Raises ``hipErrorInvalidValue`` for a peer on another node, or what
        ``DeviceBuffer.allocate``/``open`` raise, on every rank of the node.
        """
        own: DeviceBuffer | None = None
        error: BaseException | None = None
        self._check_open()  # before any collective: a closed NodeComm has no communicators
        try:
            own = DeviceBuffer.allocate(nbytes, device=device)
            handle = own.export()
        except BaseException as exc:
            error, handle = exc, None
        try:
            opened = self._share(
                handle,
                error,
                peers,
                DeviceBuffer.from_handle,
                DeviceBuffer.close,
                "allocate_shared",
                own,
            )
        except BaseException:
            if own is not None:
                own.close()  # every peer's import was rolled back: the agreement failed
            raise
        assert own is not None
        self._owned.append(own)
        self._record(opened, self._imported)
        return own, opened

    def exchange(
        self, buf: DeviceBuffer | int, peers: Iterable[int] | None = None
    ) -> dict[int, DeviceBuffer]:
        """Open the on-node peers' buffers: this rank offers ``buf`` (a ``DeviceBuffer`` or a
        ``hipMalloc`` pointer, exported here) and gets ``{rank: opened buffer}``.

        Collective on the node; ``peers`` as in :meth:`allocate_shared` (this rank maps to
        ``buf`` itself).  The caller keeps ``buf`` and must keep it alive until every peer
        closed its import: call :meth:`close` (collective) before freeing it.  The opened
        buffers are closed by :meth:`close`, or earlier by the caller.
        """
        error: BaseException | None = None
        handle = None
        self._check_open()  # before any collective: a closed NodeComm has no communicators
        try:
            if isinstance(buf, DeviceBuffer):
                handle = buf.export()
            else:
                handle = runtime.hipIpcGetMemHandle(buf)
        except BaseException as exc:
            error = exc
        opened = self._share(
            handle,
            error,
            peers,
            DeviceBuffer.from_handle,
            DeviceBuffer.close,
            "exchange",
            buf if isinstance(buf, DeviceBuffer) else None,
        )
        self._record(opened, self._imported)
        return opened

    def exchange_events(self, event: Event, peers: Iterable[int] | None = None) -> dict[int, Event]:
        """Open the on-node peers' IPC events (``hipIpcOpenEventHandle``): ``{rank: event}``.

        ``event`` must be interprocess (``hipEventCreateWithFlags(hipEventInterprocess |
        hipEventDisableTiming)``, else ``hipErrorInvalidValue``).  Collective on the node;
        ``peers`` as in :meth:`allocate_shared` (this rank maps to ``event``).  The opened
        events are destroyed by :meth:`close`; the caller destroys its own ``event`` after.
        """
        error: BaseException | None = None
        handle = None
        self._check_open()  # before any collective: a closed NodeComm has no communicators
        try:
            handle = runtime.hipIpcGetEventHandle(event)
        except BaseException as exc:
            error = exc
        opened = self._share(
            handle,
            error,
            peers,
            runtime.hipIpcOpenEventHandle,
            runtime.hipEventDestroy,
            "exchange_events",
            event,
        )
        self._record(opened, self._events)
        return opened

    # -- closing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise HipError(hipError_t.hipErrorInvalidValue, "this NodeComm is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, *, collective: bool = True) -> None:
        """Close imports and opened events, wait for the node, then free this rank's buffers.

        Collective on ``comm`` (the node barrier orders every importer's close before any
        owner's free, CUDA's rule; then the split communicators are freed).  Idempotent.
        ``collective=False`` skips every collective: for an error path where other ranks may
        never arrive (the frees then revoke names early; mappings already open stay valid on
        the host backend).  Raises the first error a close or free raised, after all ran.
        """
        if self._closed:
            return
        self._closed = True
        first: BaseException | None = None
        for obj in self._imported:
            try:
                obj.close()
            except BaseException as exc:
                first = first or exc
        for event in self._events:
            try:
                if not event.destroyed:
                    runtime.hipEventDestroy(event)
            except BaseException as exc:
                first = first or exc
        self._imported, self._events = [], []
        if collective:
            self.node.Barrier()
        for buf in self._owned:
            try:
                buf.close()
            except BaseException as exc:
                first = first or exc
        self._owned = []
        if collective:
            if self.leaders != MPI.COMM_NULL:
                self.leaders.Free()
            self.node.Free()
        if first is not None:
            raise first

    def __enter__(self) -> NodeComm:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        # On an exception the other ranks may be elsewhere: a barrier could wait forever.
        self.close(collective=exc_type is None)

    def __repr__(self) -> str:
        kind = f"simulated {self.simulated}" if self.simulated else "shared-memory"
        return (
            f"<NodeComm rank {self.rank}/{self.size}, node {self.node_index} of "
            f"{self.num_nodes} ({kind}), node ranks {list(self.node_ranks)}"
            f"{', closed' if self._closed else ''}>"
        )
