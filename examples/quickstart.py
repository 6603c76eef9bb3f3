"""Quick start: share one buffer between two processes with a 64-byte handle.

The producer allocates and fills a buffer, exports it, and sends the handle's 64 bytes to a
consumer process through a pipe.  The consumer opens the handle, checks the data, doubles it
in place and closes.  The producer then sees the consumer's writes (no copy was made) and
frees the buffer.  Exits non-zero if any check fails.
"""

from __future__ import annotations

import multiprocessing as mp
import sys

import numpy as np

import hipipc as hip

N = 1 << 20  # float32 elements: 4 MiB


def consumer(conn) -> None:
    try:
        handle_bytes = conn.recv_bytes()  # exactly 64 bytes
        ptr = hip.hipIpcOpenMemHandle(handle_bytes, hip.hipIpcMemLazyEnablePeerAccess)
        data = hip.asarray(ptr, N, np.float32)
        ok = bool(np.array_equal(data, np.arange(N, dtype=np.float32)))
        data *= 2  # writes go straight into the producer's memory
        del data
        hip.hipIpcCloseMemHandle(ptr)
        conn.send(ok)
    except Exception as exc:  # report, so the producer fails loudly instead of hanging
        conn.send(exc)


def main() -> int:
    ptr = hip.hipMalloc(N * 4)
    try:
        hip.hipMemcpy(ptr, np.arange(N, dtype=np.float32), N * 4, hip.hipMemcpyHostToDevice)
        handle = hip.hipIpcGetMemHandle(ptr)
        print(f"producer: exported {N * 4} bytes as {handle}")

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=consumer, args=(child,))
        proc.start()
        try:
            parent.send_bytes(bytes(handle))
            if not parent.poll(60):
                raise TimeoutError("consumer did not answer within 60 s")
            reply = parent.recv()
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        if isinstance(reply, Exception):
            raise reply
        print(f"consumer: data {'matched' if reply else 'DID NOT match'}; doubled it in place")

        result = np.empty(N, dtype=np.float32)
        hip.hipMemcpy(result, ptr, N * 4, hip.hipMemcpyDeviceToHost)
        doubled = np.array_equal(result, 2 * np.arange(N, dtype=np.float32))
        print(f"producer: consumer's writes {'visible' if doubled else 'MISSING'}")
        return 0 if (reply and doubled and proc.exitcode == 0) else 1
    finally:
        hip.hipFree(ptr)


if __name__ == "__main__":
    sys.exit(main())
