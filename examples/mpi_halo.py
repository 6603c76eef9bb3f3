"""1-D Jacobi halo exchange: hipipc inside a node, MPI across nodes.

A periodic rod of N points is split into equal slices, one per rank; every step replaces each
point by the mean of its two neighbours, so each rank needs one value from each neighbouring
slice (its halo).  A neighbour on the same node is read in place, straight out of its hipipc
buffer; a neighbour on another node sends its edge value with MPI.

Ordering: each rank's buffer holds two copies of its slice (step t reads copy t % 2 and writes
the other), so one node barrier per step is enough: after it, every copy about to be read is
complete, and every copy about to be overwritten has been read.  Off-node halos travel with
nonblocking ``Isend``/``Irecv`` and one ``Waitall``: a blocking send around the ring would wait
forever when every neighbour is off-node (try ``HIPIPC_MPI_NODES`` equal to the rank count).

The result is checked against a pure-MPI run of the same decomposition (every halo a message),
bit for bit, and rank 0 prints ``mpi_halo: PASSED``.

    mpiexec -n 4 python examples/mpi_halo.py
    HIPIPC_MPI_NODES=2 mpiexec -n 4 python examples/mpi_halo.py   # 2 simulated nodes
    HIPIPC_MPI_NODES=4 mpiexec -n 4 python examples/mpi_halo.py   # every neighbour off-node
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from mpi4py import MPI

from hipipc.mpi import NodeComm
from hipipc.registry import get_registry

TO_LEFT, TO_RIGHT = 1, 2  # message tags: a first value goes left, a last value goes right


def halos(
    comm, cur: np.ndarray, left: int, right: int, views: dict[int, np.ndarray], t: int
) -> tuple[float, float]:
    """This step's (left, right) halo: read in place from ``views``, or received by MPI."""
    got = {"left": np.empty(1), "right": np.empty(1)}
    reqs = []
    if left not in views:
        reqs.append(comm.Irecv(got["left"], source=left, tag=TO_RIGHT))
        reqs.append(comm.Isend(cur[:1], dest=left, tag=TO_LEFT))
    if right not in views:
        reqs.append(comm.Irecv(got["right"], source=right, tag=TO_LEFT))
        reqs.append(comm.Isend(cur[-1:], dest=right, tag=TO_RIGHT))
    MPI.Request.Waitall(reqs)
    lv = views[left][t % 2, -1] if left in views else got["left"][0]
    rv = views[right][t % 2, 0] if right in views else got["right"][0]
    return float(lv), float(rv)


def step(cur: np.ndarray, nxt: np.ndarray, lv: float, rv: float) -> None:
    nxt[1:-1] = 0.5 * (cur[:-2] + cur[2:])
    nxt[0] = 0.5 * (lv + cur[1])
    nxt[-1] = 0.5 * (cur[-2] + rv)


def jacobi_hipipc(nc: NodeComm, u0: np.ndarray, iters: int) -> tuple[np.ndarray, dict]:
    """Jacobi with on-node halos read in place through hipipc buffers."""
    comm, rank, size = nc.comm, nc.rank, nc.size
    left, right = (rank - 1) % size, (rank + 1) % size
    local = [p for p in (left, right) if nc.is_local(p)]
    n = u0.size
    mine, peers = nc.allocate_shared(2 * n * u0.itemsize, peers=local)
    u = mine.asarray(np.float64, (2, n))
    u[0] = u0
    views = {p: buf.asarray(np.float64, (2, n)) for p, buf in peers.items()}
    opened = get_registry().live_counts()[1]  # hipipc imports held by this process
    nc.node.Barrier()  # every slice written before a neighbour reads it
    for t in range(iters):
        lv, rv = halos(comm, u[t % 2], left, right, views, t)
        step(u[t % 2], u[1 - t % 2], lv, rv)
        nc.node.Barrier()
    report = {
        "rank": rank,
        "node": nc.node_index,
        "nodes": nc.num_nodes,
        "on_node": sorted(set(local) - {rank}),
        "off_node": sorted({left, right} - set(local)),
        "opened": opened,
    }
    return u[iters % 2].copy(), report


def jacobi_mpi(comm, u0: np.ndarray, iters: int) -> np.ndarray:
    """The reference: the same decomposition, every halo an MPI message."""
    rank, size = comm.Get_rank(), comm.Get_size()
    left, right = (rank - 1) % size, (rank + 1) % size
    u = np.stack([u0, u0])
    views = {rank: u} if size == 1 else {}  # a ring of one is its own neighbour
    for t in range(iters):
        lv, rv = halos(comm, u[t % 2], left, right, views, t)
        step(u[t % 2], u[1 - t % 2], lv, rv)
    return u[iters % 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=4096, help="points in the whole rod")
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.points % size or args.points // size < 2:
        if rank == 0:
            print(
                f"mpi_halo: --points must be a multiple of {size} (ranks), >= 2 per rank",
                file=sys.stderr,
            )
        return 2
    n = args.points // size
    rod = np.random.default_rng(2024).random(args.points)  # the same on every rank
    u0 = rod[rank * n : (rank + 1) * n].copy()

    with NodeComm(comm) as nc:
        result, report = jacobi_hipipc(nc, u0, args.iters)
    reference = jacobi_mpi(comm, u0, args.iters)

    mismatches = int(np.count_nonzero(result != reference))  # bit for bit
    total = comm.allreduce(mismatches, op=MPI.SUM)
    reports = comm.gather(report, root=0)  # one printer: lines of many ranks interleave
    if rank == 0:
        print(
            f"mpi_halo: {size} ranks on {report['nodes']} node(s), {args.points} points, "
            f"{args.iters} steps"
        )
        for r in reports:
            print(
                f"rank {r['rank']}: node {r['node']}, on-node neighbours {r['on_node']} "
                f"(hipipc opens: {r['opened']}), off-node neighbours {r['off_node']}"
            )
        if total:
            print(f"mpi_halo: FAILED ({total} values differ from the pure-MPI reference)")
        else:
            print("mpi_halo: PASSED (equal to the pure-MPI reference)")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
