"""Exporter liveness for open: is the process a segment header names still running?

The store calls this on every open (CUDA's rule: a process's memory dies with it, so a killed
exporter's handle must stop opening), so the answer is cached per exporter (pid, start time,
pid namespace): the first sight opens a pidfd and reads ``/proc/<pid>/stat`` once (start time
after the pidfd exists, so a match proves the pidfd is the exporter's, not a reused pid's);
later sights poll that pidfd, one syscall that reports a zombie too.
"""

from __future__ import annotations

import os
import select
import threading

# Imported here, not in the calls: an import statement costs microseconds on a first call.
from .segment import own_process, process_alive, process_start_time

__all__ = ["Liveness", "exporters"]


class Liveness:
    """Cached exporter liveness for ``open``: one pidfd per exporter (pid, start, namespace).

    First sight: ``pidfd_open(pid)``, then the start time from ``/proc/<pid>/stat`` (read after
    the pidfd exists, so a match proves the pidfd is the exporter's, not a reused pid's).
    Later: ``poll`` on the pidfd, which turns readable when the process exits (zombies
    included; a multi-threaded process turns readable once its last thread is gone).  At most
    :attr:`LIMIT` descriptors are kept (the oldest entry is evicted); without pidfds (old
    kernels, EMFILE) it falls back to :func:`~hipipc.store.process_alive`, uncached.
    """

    LIMIT = 64

    def __init__(self) -> None:
        # Insertion ordered: the oldest entry is evicted first.  Read without the lock by
        # HandleStore.open's fast path: a poll of an evicted (closed, maybe reused)
        # descriptor that reports anything sends it here, where the lock decides.
        self.cache: dict[tuple[int, int, int], tuple[int, select.poll]] = {}
        self._lock = threading.Lock()

    def alive(self, pid: int, start: int, pidns: int) -> bool:
        key = (pid, start, pidns)
        with self._lock:  # polls under the lock: eviction may close a descriptor
            hit = self.cache.get(key)
            if hit is not None:
                if not hit[1].poll(0):
                    return True
                del self.cache[key]
                os.close(hit[0])
                return False
        own = own_process()
        if key == own:
            return True
        if pidns and own[2] and pidns != own[2]:
            return True  # another pid namespace: nothing here can tell, err towards alive
        return self._first_sight(key)

    def _first_sight(self, key: tuple[int, int, int]) -> bool:
        pid, start, pidns = key
        if pid <= 0:
            return False
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except (OSError, AttributeError):
            return process_alive(pid, start, pidns)
        now = process_start_time(pid)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if now is None or now not in (-1, start) or poller.poll(0):
            os.close(fd)
            return False
        with self._lock:
            stale = [self.cache.pop(key, None)]  # another thread's first sight of it
            self.cache[key] = (fd, poller)
            if len(self.cache) > self.LIMIT:
                stale.append(self.cache.pop(next(iter(self.cache))))
        for old in stale:
            if old is not None:
                os.close(old[0])
        return True

    def after_fork(self) -> None:
        """In a forked child: a fresh lock and an empty cache, the inherited pidfds closed
        now, while they are still ours: a child that closes all its descriptors and reuses
        the numbers must never have its own files closed by a later eviction."""
        self._lock = threading.Lock()
        stale, self.cache = self.cache, {}
        for fd, _ in stale.values():
            try:
                os.close(fd)
            except OSError:
                pass


exporters = Liveness()
os.register_at_fork(after_in_child=exporters.after_fork)
