"""Hogwild!: workers train one model together, updating shared parameters in place, lock-free.

A torch-free port of PyTorch's ``examples/mnist_hogwild`` pattern (``model.share_memory()``,
then several processes run SGD on the same parameters without any lock).  Here the model is a
linear regression; its weights live in one :class:`hipipc.DeviceBuffer`, and each worker of a
``multiprocessing`` Pool receives numpy arrays over it: the weights, and a one-element slice
of a step counter (a view at an offset, so each worker writes its own slot).  Pickling those
arrays sends the allocation's handle with offset, shape, strides and dtype; the workers get
zero-copy views of the same bytes and ``w -= lr * grad`` lands straight in the parent's
memory, racing with the other workers exactly as Hogwild! allows.

The parent checks its own result: the shared weights converged to the true ones (only
possible if every worker's updates reached the same memory), each worker's step counter
arrived, and the workers were other processes.  Prints ``hogwild: PASSED``, or exits 1 with
``hogwild: FAILED``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import numpy as np

import hipipc as hip

WORKERS = 4
FEATURES = 8
SAMPLES = 2000  # per worker
EPOCHS = 5
BATCH = 50
LR = 0.05
TRUE_W = np.linspace(-2.0, 2.0, FEATURES)


def shard(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A worker's training data: y = X @ TRUE_W + a little noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((SAMPLES, FEATURES))
    return x, x @ TRUE_W + 0.01 * rng.standard_normal(SAMPLES)


def train(w: np.ndarray, steps: np.ndarray, seed: int) -> int:
    """Runs in a worker: plain SGD on the shared weights ``w``, in place, no lock."""
    x, y = shard(seed)
    rng = np.random.default_rng(seed + 1000)
    for _ in range(EPOCHS):
        order = rng.permutation(SAMPLES)
        for start in range(0, SAMPLES, BATCH):
            idx = order[start : start + BATCH]
            xb, yb = x[idx], y[idx]
            grad = xb.T @ (xb @ w - yb) / len(idx)  # reads w as other workers change it
            w -= LR * grad  # Hogwild!: an unsynchronised in-place update of shared memory
            steps[0] += 1  # this worker's own slot: no race
    return os.getpid()


def main() -> int:
    nbytes = FEATURES * 8 + WORKERS * 8
    with hip.DeviceBuffer.allocate(nbytes) as buf:
        w = buf[: FEATURES * 8].asarray(np.float64)  # the model's parameters, shared
        steps = buf[FEATURES * 8 :].asarray(np.int64)  # one counter per worker
        w[:] = 0.0
        steps[:] = 0
        ctx = mp.get_context("spawn")
        with ctx.Pool(WORKERS) as pool:
            tasks = [(w, steps[i : i + 1], 7 * i + 1) for i in range(WORKERS)]
            pids = pool.starmap_async(train, tasks, chunksize=1).get(timeout=300)
        expected = EPOCHS * -(-SAMPLES // BATCH)
        x_test, y_test = shard(12345)
        loss = float(np.mean((x_test @ w - y_test) ** 2))
        error = float(np.max(np.abs(w - TRUE_W)))
        print(
            f"hogwild: {WORKERS} tasks in {len(set(pids))} worker process(es) ran "
            f"{steps.tolist()} SGD steps on {FEATURES} shared parameters in place"
        )
        print(f"hogwild: test loss {loss:.5f}, largest weight error {error:.4f}")
        ok = (
            os.getpid() not in pids
            and steps.tolist() == [expected] * WORKERS
            and error < 0.05
            and loss < 0.01
        )
        del w, steps  # the arrays keep the buffer alive; close() frees it regardless
    print("hogwild: PASSED" if ok else "hogwild: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
