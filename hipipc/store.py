"""The handle store: a private, non-listable directory of segments on /dev/shm.

Why not ``shm_open``: its namespace is flat and world-listable, so every live name would be
visible to every user, the DRM flink flaw the amdkfd IPC review warned about.  Instead each
user has a directory (default ``/dev/shm/hipipc-{uid}``, mode 0711) on the same tmpfs: others
may open a file whose exact name they know, nobody else may list.

A *segment* is one file: a one-page header (who exported it, a verifier of the handle, sizes)
followed by the payload (the memory itself for host allocations, event state, or a GPU IPC
handle).  ``create`` makes it unnamed (``O_TMPFILE``); only ``publish`` (the explicit export
step) links it in, under :attr:`IpcHandle.segment_name`, a one-way digest of the handle.
``revoke`` unlinks the name: new opens fail, existing mappings stay valid.

Liveness at open: the header names its exporter (pid, start time, pid namespace); ``open``
reads it with the same ``pread`` as the identity, and a handle whose exporter is gone (killed:
no exit hook ran) is refused with ``hipErrorInvalidResourceHandle`` and its name reclaimed.
The check is cached per exporter (:class:`_Liveness`): the first sight of an exporter opens a
pidfd and reads ``/proc/<pid>/stat`` once; every later open polls that pidfd (one syscall,
no /proc read), which also catches a zombie and can never be fooled by a reused pid.

Tickets (send-and-drop, :mod:`hipipc.buffer`): ``issue_ticket`` links the exported segment
under one more name, a one-way digest of a fresh 128-bit secret carried in a pickle;
``open(handle, ticket)`` opens through that name, with the same checks, and unlinks it.  The
ticket keeps the file alive after its exporter revoked the main name.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import resource
import secrets
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import HipError, hipError_t
from .handle import HandleKind, IpcHandle
from .liveness import exporters as _liveness

__all__ = [
    "HandleStore",
    "SegmentInfo",
    "PAGE_SIZE",
    "share_mode",
    "DEFAULT_STORE",
]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
DEFAULT_STORE = "/dev/shm/hipipc-{uid}"
STORE_ENV = "HIPIPC_STORE"
SHARE_ENV = "HIPIPC_SHARE"

_SHARE_MODES = {"user": 0o600, "group": 0o660, "all": 0o666}

# The header is the segment's identity (everything the handle determines: magic, version,
# kind, verifier, size, device, uid), then its exporter (pid, pid namespace, start time,
# created).
_IDENTITY = struct.Struct("<8sII32sQII")
_EXPORTER = struct.Struct("<IIQd")
_HEADER_SIZE = _IDENTITY.size + _EXPORTER.size
_HEADER_MAGIC = b"hipipcSG"
_HEADER_VERSION = 1


def _identity(handle: IpcHandle) -> bytes:
    return _IDENTITY.pack(_HEADER_MAGIC, _HEADER_VERSION, int(handle.kind), handle.verifier,
                          handle.size, handle.device, handle.uid)

_O_CLOEXEC = os.O_CLOEXEC
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC
_IMPORT_FLAGS = os.O_RDWR | os.O_NOFOLLOW | _O_CLOEXEC
_EMFILE_HINT = "too many open files"


def share_mode(share: str | None = None) -> int:
    """File mode for a published segment: ``share`` or ``$HIPIPC_SHARE`` (default ``user``).

    Raises ``HipError(hipErrorInvalidValue)`` for anything but ``user``, ``group`` or ``all``.
    """
    value = share if share is not None else os.environ.get(SHARE_ENV, "user")
    try:
        return _SHARE_MODES[value.strip().lower()]
    except (KeyError, AttributeError):
        raise HipError(
            hipError_t.hipErrorInvalidValue,
            f"sharing policy {value!r} is not one of user, group, all "
            f"(set by the share argument or ${SHARE_ENV})",
        ) from None


@dataclass(frozen=True)
class SegmentInfo:
    """The parsed header of a segment."""

    kind: HandleKind
    size: int
    device: int
    uid: int
    pid: int
    start_time: int
    created: float
    verifier: bytes
    pid_namespace: int = 0

    @classmethod
    def parse(cls, raw: bytes) -> SegmentInfo | None:
        if len(raw) < _HEADER_SIZE:
            return None
        magic, version, kind, verifier, size, device, uid = _IDENTITY.unpack_from(raw)
        pid, pidns, start, created = _EXPORTER.unpack_from(raw, _IDENTITY.size)
        if magic != _HEADER_MAGIC or version != _HEADER_VERSION:
            return None
        try:
            kind = HandleKind(kind)
        except ValueError:
            return None
        return cls(kind, size, device, uid, pid, start, created, verifier, pidns)

    def exporter_alive(self) -> bool:
        """Whether the exporting process still runs (pid plus start time: safe against reuse)."""
        return process_alive(self.pid, self.start_time, self.pid_namespace)


def process_alive(pid: int, start_time: int, pid_namespace: int) -> bool:
    """Whether process (pid, start time) of ``pid_namespace`` still runs.

    Errs towards "alive" where it cannot tell: a process of another pid namespace (containers
    sharing /dev/shm) or one that /proc hides (hidepid).  A reused pid has another start time.
    """
    if pid_namespace and pid_namespace != own_process()[2]:
        return True
    now = process_start_time(pid)
    return now is not None and now in (-1, start_time)


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if it is not running.

    A zombie (killed or exited, not yet reaped by its parent) counts as not running: it keeps
    its pid and start time in /proc but can never run again, so its segments are orphans.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        # hidepid=2 hides other users' processes entirely; signal 0 still tells they exist.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:
            return -1
        return -1
    except OSError:
        # /proc mounted with hidepid=1: we cannot tell, so treat the process as alive.
        return -1
    # Field 2 (comm) may contain spaces and parentheses; fields resume after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # field 3, the state: zombie or dead
        return None
    return int(fields[19])


_own_start: tuple[int, int, int] | None = None


def own_process() -> tuple[int, int, int]:
    """This process's (pid, start time, pid namespace inode): what segment headers and event
    records name, so that liveness checks survive pid reuse and tell namespaces apart."""
    global _own_start
    pid = os.getpid()
    if _own_start is None or _own_start[0] != pid:
        try:
            pidns = os.stat("/proc/self/ns/pid").st_ino & 0xFFFFFFFF
        except OSError:
            pidns = 0
        _own_start = (pid, max(process_start_time(pid) or 0, 0), pidns)
    return _own_start


def ticket_name(secret: bytes) -> str:
    """The store name of a ticket: a one-way digest of its secret (same shape as a segment's)."""
    return hashlib.blake2b(secret, digest_size=20, person=b"hipipc.ticket").hexdigest()


def _remove_if_empty(path: str) -> None:
    """At exit of a process that exported, remove its store if nothing is left in it, so a
    normal run leaves nothing in /dev/shm.  rmdir fails on a store in use (unnamed segments
    do not count: they are linked on export), and a process that finds its cached store
    removed recreates it."""
    try:
        os.rmdir(path)
    except OSError:
        pass


def raise_fd_limit() -> bool:
    """Raise the soft RLIMIT_NOFILE toward the hard one; True if it went up."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft * 4, 65536)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return False
    new = min(target, max(soft * 4, 4096))
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return True


def _fd_exhausted(action: str) -> HipError:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return HipError(
        hipError_t.hipErrorOutOfMemory,
        f"{action}: {_EMFILE_HINT} (RLIMIT_NOFILE soft={soft}, hard={hard}); every unexported "
        "allocation holds one descriptor: export, free, or raise the hard limit (ulimit -Hn)",
    )


def _os_call(action: str, fn, *args, **kwargs):
    """Call ``fn``; on EMFILE raise the soft fd limit once and retry."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        if not raise_fd_limit():
            raise _fd_exhausted(action) from exc
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _fd_exhausted(action) from exc
        raise


def _same_live_dir(old: int, new: int) -> bool:
    """Whether two directory descriptors name the same directory, still linked in."""
    a, b = os.fstat(old), os.fstat(new)
    return a.st_nlink > 0 and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class HandleStore:
    """One namespace of exported segments: the directory ``template`` names.

    ``template`` (default ``$HIPIPC_STORE`` or ``/dev/shm/hipipc-{uid}``) may contain
    ``{uid}``, expanded to the exporter's uid, so that an importer finds the directory from the
    handle alone.  Directory descriptors are cached (``O_PATH``: an importer cannot open a 0711
    directory for reading) and reopened once when a lookup misses, since a store can be
    removed and recreated.
    """

    def __init__(self, template: str | None = None) -> None:
        self.template = template or os.environ.get(STORE_ENV) or DEFAULT_STORE
        self._dirs: dict[str, int] = {}
        self._retired: list[int] = []  # replaced directory descriptors, closed by close()
        self._lock = threading.Lock()
        self._swept = False

    # -- directories ---------------------------------------------------------------------

    def path_for(self, uid: int) -> str:
        """The store directory holding segments exported by ``uid``."""
        return self.template.replace("{uid}", str(uid))

    def _refuse(self, path: str, why: str, importing: bool) -> HipError:
        code = (
            hipError_t.hipErrorInvalidResourceHandle if importing
            else hipError_t.hipErrorOperatingSystem
        )
        return HipError(
            code,
            f"refusing handle store {path}: {why}. A store must be a real directory owned by "
            "its user (or by root), not readable or writable by others; remove it or set "
            f"${STORE_ENV} to another path",
        )

    def _verify_dir(self, fd: int, path: str, owner: int, importing: bool) -> None:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            raise self._refuse(path, "not a directory", importing)
        if st.st_uid not in (owner, 0):
            raise self._refuse(path, f"owned by uid {st.st_uid}, expected {owner} or root",
                               importing)
        mode = stat.S_IMODE(st.st_mode)
        admin_shared = st.st_uid == 0 and mode & stat.S_ISVTX
        forbidden = 0o044 if admin_shared else 0o066
        if mode & forbidden:
            raise self._refuse(path, f"mode {mode:04o} lets others list or write it", importing)

    def _open_dir(self, path: str, owner: int, importing: bool) -> int:
        try:
            fd = _os_call("opening the handle store", os.open, path, _DIR_FLAGS)
        except FileNotFoundError:
            if importing:
                raise
            fd = self._make_dir(path)
        except NotADirectoryError:
            kind = "a symbolic link" if os.path.islink(path) else "not a directory"
            raise self._refuse(path, kind, importing) from None
        except PermissionError as exc:
            raise self._refuse(path, f"cannot reach it ({exc.strerror})", importing) from None
        try:
            self._verify_dir(fd, path, owner, importing)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _make_dir(self, path: str) -> int:
        parent = os.path.dirname(path)
        if parent and not os.path.isdir(parent):
            raise HipError(hipError_t.hipErrorOperatingSystem,
                           f"cannot create handle store {path}: {parent} does not exist "
                           f"(is /dev/shm mounted? set ${STORE_ENV})")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        fd = os.open(path, _DIR_FLAGS)
        # mkdir's mode is filtered by the umask; set 0711 through the descriptor's magic link
        # (O_PATH descriptors cannot be fchmod'ed) so no path race can redirect the chmod.
        if os.fstat(fd).st_uid == os.geteuid():
            os.chmod(f"/proc/self/fd/{fd}", 0o711)
        return fd

    def _dir_fd(self, uid: int, importing: bool, fresh: bool = False) -> int:
        path = self.path_for(uid)
        with self._lock:
            fd = self._dirs.get(path)
            if fd is not None and not fresh:
                return fd
            new = self._open_dir(path, uid, importing)
            if fd is not None:
                if _same_live_dir(fd, new):
                    os.close(new)  # the store was not recreated: keep the cached one
                    return fd
                # Other threads read the cached descriptor without the lock and may be about
                # to use it: closing it could hand its number to another file under them
                # (EBADF, ENOTDIR, or a different directory).  Keep it until close().
                self._retired.append(fd)
            self._dirs[path] = new
        return new

    def own_path(self) -> str:
        return self.path_for(os.geteuid())

    # -- exporter side -------------------------------------------------------------------

    def create(self, handle: IpcHandle, payload_size: int) -> int:
        """Create the unnamed segment for ``handle`` and return its descriptor.

        Reserves ``payload_size`` bytes after the header with ``posix_fallocate`` so a full
        tmpfs fails here with ``hipErrorOutOfMemory``, never with SIGBUS on first touch.  The
        file has mode 0600 and no name; it vanishes with its last descriptor and mapping.
        """
        flags = os.O_TMPFILE | os.O_RDWR | _O_CLOEXEC
        dfd = self._dir_fd(os.geteuid(), importing=False)
        try:
            try:
                fd = _os_call("creating a segment", os.open, ".", flags, 0o600, dir_fd=dfd)
            except FileNotFoundError:
                # The cached store was removed (another process's exit cleanup, an admin):
                # recreate it, verified as usual.
                dfd = self._dir_fd(os.geteuid(), importing=False, fresh=True)
                fd = _os_call("creating a segment", os.open, ".", flags, 0o600, dir_fd=dfd)
        except OSError as exc:
            raise HipError(hipError_t.hipErrorOperatingSystem,
                           f"cannot create a segment in {self.own_path()}: {exc.strerror} "
                           "(the store must be on a filesystem with O_TMPFILE, e.g. tmpfs)"
                           ) from exc
        try:
            os.fchmod(fd, 0o600)  # O_TMPFILE's mode is filtered by the umask
            total = PAGE_SIZE + -(-payload_size // PAGE_SIZE) * PAGE_SIZE
            try:
                os.posix_fallocate(fd, 0, total)
            except OverflowError:  # beyond off_t: no file system can hold it
                raise HipError(
                    hipError_t.hipErrorOutOfMemory,
                    f"cannot reserve {payload_size} bytes: larger than any file can be",
                ) from None
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                    raise HipError(
                        hipError_t.hipErrorOutOfMemory,
                        f"cannot reserve {payload_size} bytes in {self.own_path()}: "
                        f"{exc.strerror} (the tmpfs behind the store is full or too small)",
                    ) from exc
                raise
            pid, start, pidns = own_process()
            os.pwrite(fd, _identity(handle) + _EXPORTER.pack(pid, pidns, start, time.time()), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def publish(self, fd: int, handle: IpcHandle, mode: int) -> None:
        """Give the segment behind ``fd`` its name: the explicit export step."""
        if not self._swept:
            # The store is removed at exit by remove_if_empty, which the registry's exit hook
            # calls after revoking this process's exports (an earlier atexit hook would run
            # before them and find the store in use).
            self._swept = True
            try:
                self.collect()
            except OSError:
                # The sweep is opportunistic and must never fail the export: at the fd limit
                # (EMFILE) exporting is what gives an unexported allocation's descriptor back.
                pass
        dfd = self._dir_fd(os.geteuid(), importing=False)
        os.fchmod(fd, mode)
        # os.link only uses linkat(AT_SYMLINK_FOLLOW) when a dir_fd is given; plain link(2)
        # does not follow the /proc magic link and fails with EXDEV.
        try:
            os.link(f"/proc/self/fd/{fd}", handle.segment_name, dst_dir_fd=dfd)
        except FileNotFoundError:
            # The cached store was removed under this process (an admin's cleanup,
            # systemd-logind's RemoveIPC): recreate it, verified as usual, and link there.
            dfd = self._dir_fd(os.geteuid(), importing=False, fresh=True)
            os.link(f"/proc/self/fd/{fd}", handle.segment_name, dst_dir_fd=dfd)

    def revoke(self, handle: IpcHandle) -> None:
        """Remove the segment's name: later opens fail, open mappings stay valid."""
        dfd = self._dir_fd(os.geteuid(), importing=False)
        try:
            os.unlink(handle.segment_name, dir_fd=dfd)
        except FileNotFoundError:
            pass

    def remove_if_empty(self) -> None:
        """At exit of a process that exported: remove its store if nothing is left in it."""
        if self._swept:
            _remove_if_empty(self.own_path())

    def issue_ticket(self, handle: IpcHandle) -> tuple[bytes, str]:
        """Link the exported segment of ``handle`` under a fresh ticket: (secret, name).

        Raises ``hipErrorInvalidResourceHandle`` if the segment has no name any more.
        """
        secret = secrets.token_bytes(16)
        name = ticket_name(secret)
        dfd = self._dir_fd(os.geteuid(), importing=False)
        try:
            os.link(handle.segment_name, name, src_dir_fd=dfd, dst_dir_fd=dfd,
                    follow_symlinks=False)
        except FileNotFoundError:
            raise HipError(hipError_t.hipErrorInvalidResourceHandle,
                           "cannot send the memory: its export was revoked (freed, or the "
                           "process is exiting)") from None
        return secret, name

    def discard(self, name: str) -> bool:
        """Unlink ``name`` from this user's store if it exists; True if it was there."""
        path = self.own_path()
        dfd = self._dirs.get(path)
        if dfd is None:
            if not os.path.isdir(path):
                return False
            dfd = self._dir_fd(os.geteuid(), importing=False)
        try:
            os.unlink(name, dir_fd=dfd)
            return True
        except OSError:
            return False

    def exists(self, name: str) -> bool:
        """Whether ``name`` is in this user's store (a ticket not consumed yet)."""
        dfd = self._dirs.get(self.own_path())
        if dfd is None:
            return False
        try:
            os.stat(name, dir_fd=dfd, follow_symlinks=False)
            return True
        except OSError:
            return False

    # -- importer side -------------------------------------------------------------------

    def open(self, handle: IpcHandle, ticket: bytes | None = None) -> int:
        """Open the segment ``handle`` names and return its descriptor (``O_RDWR``).

        Never creates.  Checks, on the opened descriptor (no TOCTOU): a regular file owned by
        the handle's uid with no mode bits beyond 0666, long enough, and a header whose
        identity equals the handle's, compared in constant time.  Raises
        ``hipErrorInvalidResourceHandle`` when no such segment exists (never exported, freed,
        exporter gone) or it may not be opened, with the reason.  A segment whose exporter was
        killed is refused too ("the exporter exited") and its name unlinked where this user
        may (its own store).

        ``ticket`` (a send-and-drop pickle's secret): open through the ticket's name, falling
        back to the main name if the ticket was consumed already, and unlink the ticket.
        """
        name = handle.segment_name
        names = [name] if ticket is None else [ticket_name(ticket), name]
        dfd = self._dirs.get(self.path_for(handle.uid))
        fd = -1
        if ticket is None and dfd is not None:  # the common case, without the retry loop
            try:
                fd = os.open(name, _IMPORT_FLAGS, dir_fd=dfd)
            except OSError:
                pass  # every error is sorted out by the general path below
        if fd < 0:
            fd, name, dfd = self._open_first(handle, names)
        if fd < 0:
            raise HipError(
                hipError_t.hipErrorInvalidResourceHandle,
                "no exported allocation or event matches this handle (never exported, freed "
                f"by its exporter, exporter exited, or its store {self.path_for(handle.uid)} is "
                "another namespace)",
            )
        try:
            st = os.fstat(fd)
            # A regular file (S_IFREG) with no permission bits beyond rw for all.
            if st.st_mode & ~0o666 != stat.S_IFREG or st.st_uid != handle.uid:
                raise HipError(hipError_t.hipErrorInvalidResourceHandle,
                               f"the segment is not a regular file of uid {handle.uid} with "
                               f"an expected mode (uid {st.st_uid}, mode {st.st_mode:o})")
            # One pread for the identity and the exporter: the liveness check costs no read.
            raw = os.pread(fd, _HEADER_SIZE, 0) if st.st_size >= PAGE_SIZE + handle.size \
                else b""
            if len(raw) < _HEADER_SIZE or not hmac.compare_digest(raw[:_IDENTITY.size],
                                                                  _identity(handle)):
                raise HipError(hipError_t.hipErrorInvalidResourceHandle,
                               "the segment does not match the handle")
            pid, pidns, start, _ = _EXPORTER.unpack_from(raw, _IDENTITY.size)
            # Fast path inline (open's cost is benchmarked): a cached exporter whose pidfd is
            # not readable is alive.  Any other answer takes the locked, authoritative path.
            hit = _liveness.cache.get((pid, start, pidns))
            if (hit is None or hit[1].poll(0)) and not _liveness.alive(pid, start, pidns):
                self._reclaim(handle, names, dfd, st.st_uid)
                raise HipError(hipError_t.hipErrorInvalidResourceHandle,
                               f"the exporter (pid {pid}) exited without freeing: its memory "
                               "died with it, as in CUDA")
        except BaseException:
            os.close(fd)
            raise
        if name != handle.segment_name and st.st_uid == os.geteuid():
            try:  # the ticket is consumed: the descriptor holds the file until it is mapped
                os.unlink(name, dir_fd=dfd)
            except OSError:
                pass
        return fd

    def _open_first(self, handle: IpcHandle, names: list[str]) -> tuple[int, str, int | None]:
        """Open the first of ``names`` that exists: (fd or -1, name, directory fd).

        Each name through the cached directory first; only if all miss, once more through a
        freshly opened one (the store may have been removed and recreated).
        """
        path = self.path_for(handle.uid)
        for fresh in (False, True):
            for name in names:
                dfd = None if fresh and name is names[0] else self._dirs.get(path)
                try:
                    if dfd is None:
                        dfd = self._dir_fd(handle.uid, importing=True, fresh=fresh)
                    return os.open(name, _IMPORT_FLAGS, dir_fd=dfd), name, dfd
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        return (_os_call("opening a handle", os.open, name, _IMPORT_FLAGS,
                                         dir_fd=dfd), name, dfd)
                    raise self._open_error(handle, exc) from None
        return -1, names[-1], None

    def consume_ticket(self, handle: IpcHandle, ticket: bytes) -> None:
        """Unlink a ticket without opening through it (the memory was open here already)."""
        if handle.uid == os.geteuid():
            self.discard(ticket_name(ticket))

    @staticmethod
    def _reclaim(handle: IpcHandle, names: list[str], dfd: int | None, owner: int) -> None:
        """Unlink a dead exporter's names, where this user may (its own store)."""
        if dfd is None or owner != os.geteuid() or handle.uid != owner:
            return
        for name in names:
            try:
                os.unlink(name, dir_fd=dfd)
            except OSError:
                pass

    def _open_error(self, handle: IpcHandle, exc: OSError) -> HipError:
        if exc.errno == errno.EACCES:
            return HipError(
                hipError_t.hipErrorInvalidResourceHandle,
                f"permission denied: the segment belongs to uid {handle.uid} and is not "
                f"shared with uid {os.geteuid()}; the exporter can opt in with "
                f"{SHARE_ENV}=group or {SHARE_ENV}=all",
            )
        if exc.errno == errno.ELOOP:
            return self._refuse(self.path_for(handle.uid), "a segment is a symbolic link", True)
        return HipError(hipError_t.hipErrorInvalidResourceHandle,
                        f"cannot open the segment: {exc.strerror}")

    # -- maintenance ---------------------------------------------------------------------

    def entries(self) -> Iterator[tuple[str, SegmentInfo | None, os.stat_result]]:
        """The segments in this user's store: (name, header or None, stat)."""
        path = self.own_path()
        try:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return
        except PermissionError:
            # An admin-provisioned store (root, sticky, no read for others): its users may
            # create and open names but not list them, so there is nothing to enumerate.
            return
        try:
            self._verify_dir(dfd, path, os.geteuid(), importing=False)
            for entry in os.scandir(dfd):
                # O_NONBLOCK: a FIFO someone left here (an admin-shared sticky store lets
                # every user create entries) must not block the sweep until a writer comes.
                try:
                    fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                                 | _O_CLOEXEC, dir_fd=dfd)
                except OSError:
                    continue
                try:
                    st = os.fstat(fd)
                    info = None
                    if stat.S_ISREG(st.st_mode):  # a directory or device is never a segment
                        try:
                            info = SegmentInfo.parse(os.pread(fd, _HEADER_SIZE, 0))
                        except OSError:
                            pass
                finally:
                    os.close(fd)
                yield entry.name, info, st
        finally:
            os.close(dfd)

    def collect(self) -> list[str]:
        """Unlink this user's segments whose exporter has exited (``hipipc gc``).

        A process is identified by pid and start time, so a reused pid does not keep a dead
        exporter's segments alive, nor does it get a live exporter's segments removed.
        """
        removed: list[str] = []
        if not os.path.isdir(self.own_path()):
            return removed  # nothing exported yet; do not create a store just to sweep it
        try:
            dfd = self._dir_fd(os.geteuid(), importing=False)
        except HipError:
            return removed
        uid = os.geteuid()
        for name, info, st in list(self.entries()):
            if info is None or st.st_uid != uid or info.exporter_alive():
                continue
            try:
                os.unlink(name, dir_fd=dfd)
                removed.append(name)
            except OSError:
                pass
        return removed

    def close(self) -> None:
        """Drop the cached directory descriptors (no other thread may be using the store)."""
        with self._lock:
            fds, self._dirs = list(self._dirs.values()), {}
            fds += self._retired
            self._retired = []
        for fd in fds:
            os.close(fd)
