"""A multiprocessing Pool whose workers receive device buffers, not copies of them.

The parent allocates one buffer per task and fills it.  Handing a :class:`hipipc.DeviceBuffer`
to ``Pool.starmap`` pickles only its 64-byte handle; each worker receives a buffer already
opened over the same memory, sums it, scales it in place, and returns.  When the worker drops
the buffer it is closed (``hipIpcCloseMemHandle``).  The parent sees the workers' writes in its
own buffers, then frees them.

Lifetime: the parent keeps its buffers until ``starmap`` has returned because it reads the
workers' writes afterwards; a pickled buffer would also stay alive for its receiver if the
parent dropped it right after sending (send-and-drop, see hipipc.buffer).  Exits non-zero if
any check fails.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import numpy as np

import hipipc as hip

TASKS = 6
N = 1 << 18  # float32 elements per buffer: 1 MiB


def work(buf: hip.DeviceBuffer, scale: float) -> tuple[int, float, bool]:
    """Runs in a worker: ``buf`` arrives opened (an importer, not the owner)."""
    data = buf.asarray(np.float32)
    total = float(data.sum(dtype=np.float64))
    data *= scale  # straight into the parent's memory
    return os.getpid(), total, buf.is_owner


def main() -> int:
    buffers = [hip.DeviceBuffer.allocate(N * 4) for _ in range(TASKS)]
    try:
        for i, buf in enumerate(buffers):
            buf.asarray(np.float32)[:] = i + 1
        ctx = mp.get_context("spawn")
        with ctx.Pool(2) as pool:
            # The buffers stay referenced (and open) here until every result is back.
            results = pool.starmap_async(work, [(b, 2.0) for b in buffers], chunksize=1).get(
                timeout=120
            )
        ok = True
        for i, (buf, (pid, total, owner)) in enumerate(zip(buffers, results, strict=True)):
            expect_sum = float((i + 1) * N)
            scaled = bool(np.all(buf.asarray(np.float32) == 2.0 * (i + 1)))
            good = total == expect_sum and scaled and not owner and pid != os.getpid()
            ok &= good
            print(
                f"task {i}: worker {pid} summed {total:.0f} (expected {expect_sum:.0f}), "
                f"in-place write {'seen' if scaled else 'MISSING'}"
                f"{'' if good else '  <-- FAILED'}"
            )
        workers = len({pid for pid, _, _ in results})
        print(f"{TASKS} buffers of {N * 4} bytes shared with {workers} worker process(es)")
    finally:
        for buf in buffers:
            buf.close()
    print("mp_pool: OK" if ok else "mp_pool: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
