"""The handle store: a private, non-listable directory of segments on /dev/shm.

Why not ``shm_open``: its namespace is flat and world-listable, so every live name would be
visible to every user, the DRM flink flaw the amdkfd IPC review warned about.  Instead each
user has a directory (default ``/dev/shm/hipipc-{uid}``, mode 0711) on the same tmpfs: others
may open a file whose exact name they know, nobody else may list.

A *segment* is one file: a one-page header (:mod:`.segment`: who exported it, a verifier of
the handle, sizes) followed by the payload (the memory itself for host allocations, event
state, or a GPU IPC handle).  ``create`` makes it unnamed (``O_TMPFILE``); only ``publish``
(the explicit export step) links it in, under :attr:`IpcHandle.segment_name`, a one-way
digest of the handle.
``revoke`` unlinks the name: new opens fail, existing mappings stay valid.

Liveness at open: the header names its exporter (pid, start time, pid namespace); ``open``
reads it with the same ``pread`` as the identity, and a handle whose exporter is gone (killed:
no exit hook ran) is refused with ``hipErrorInvalidResourceHandle`` and its name reclaimed.
The check is cached per exporter (:mod:`.liveness`): the first sight of an exporter opens a
pidfd and reads ``/proc/<pid>/stat`` once; every later open polls that pidfd (one syscall,
no /proc read), which also catches a zombie and can never be fooled by a reused pid.  A header
whose exporter fields cannot be trusted (:func:`untrusted_reason`: a grantee with write
access wrote them) never makes its segment dead, and a shared segment is declared dead only
when no process maps it (:func:`exporter_gone`): nobody can get a live export reclaimed.

Tickets (send-and-drop, :mod:`hipipc.buffer`): ``issue_ticket`` links the exported segment
under one more name, a one-way digest of a fresh 128-bit secret carried in a pickle;
``open(handle, ticket)`` opens through that name, with the same checks, and unlinks it.  The
ticket keeps the file alive after its exporter revoked the main name.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import hmac
import os
import resource
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import ClassVar, ParamSpec, TypeVar

from .errors import HipError, hipError_t
from .handle import NODE_ENV, HandleKind, IpcHandle, node_tag
from .liveness import exporters as _liveness
from .segment import _EXPORTER as _EXPORTER  # re-exported: tests write headers with it
from .segment import _HEADER_SIZE, _IDENTITY, _PID_LIMIT, _START_LIMIT, SegmentInfo, _identity
from .segment import exporter_gone as exporter_gone  # re-exported (hipipc.cli)
from .segment import own_process as own_process  # re-exported (liveness, backends)
from .segment import process_alive as process_alive  # re-exported (older import path)
from .segment import process_start_time as process_start_time  # re-exported
from .segment import untrusted_reason as untrusted_reason  # re-exported
from .segstore import Transport

__all__ = [
    "HandleStore",
    "SegmentInfo",
    "PAGE_SIZE",
    "share_mode",
    "DEFAULT_STORE",
]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_P = ParamSpec("_P")
_T = TypeVar("_T")
_H = TypeVar("_H", bound=IpcHandle)
DEFAULT_STORE = "/dev/shm/hipipc-{uid}"
STORE_ENV = "HIPIPC_STORE"
SHARE_ENV = "HIPIPC_SHARE"

_SHARE_MODES = {"user": 0o600, "group": 0o660, "all": 0o666}

_O_CLOEXEC = os.O_CLOEXEC
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC
_IMPORT_FLAGS = os.O_RDWR | os.O_NOFOLLOW | _O_CLOEXEC
_EMFILE_HINT = "too many open files"
# How often one operation reopens (recreates) this user's store when it vanishes under it:
# another process's exit cleanup may remove an empty store at any moment, and a recreated
# store is empty (removable) until the link lands, so a busy remover on a loaded machine can
# win a few rounds in a row (5 attempts lost twice in 1500 exports under the full suite).
_STORE_ATTEMPTS = 50


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


# Stores this process created: path -> (pid, st_dev, st_ino).  Only these are removed at exit.
_created: dict[str, tuple[int, int, int]] = {}


def _remember_created(path: str, st: os.stat_result) -> None:
    if not _created:
        atexit.register(_remove_created_stores)
    _created[path] = (os.getpid(), st.st_dev, st.st_ino)


def _remove_created_stores() -> None:
    """At exit, remove each store this process created if nothing is left in it, so a normal
    run leaves nothing in /dev/shm.

    Only a store this very process created (same directory, not one recreated by another
    process; a forked child created nothing), that it owns, and that has no sticky bit: an
    admin-provisioned store (root, sticky) or another process's store is never removed, or
    the next user would recreate it as a private store and lock everyone else out.  rmdir
    fails on a store in use (unnamed segments do not count: they are linked on export); a
    process that finds its cached store removed recreates it.
    """
    for path, (pid, dev, ino) in list(_created.items()):
        if pid != os.getpid():
            continue
        try:
            st = os.lstat(path)
            if (
                stat.S_ISDIR(st.st_mode)
                and (st.st_dev, st.st_ino) == (dev, ino)
                and st.st_uid == os.geteuid()
                and not st.st_mode & stat.S_ISVTX
            ):
                os.rmdir(path)
        except OSError:
            pass


_TICKET_BYTES = 16


def ticket_name(secret: bytes) -> str:
    """The store name of a ticket: a one-way digest of its secret (same shape as a segment's).

    Raises ``hipErrorInvalidValue`` unless ``secret`` is 16 bytes (a pickle carries it)."""
    if type(secret) is not bytes or len(secret) != _TICKET_BYTES:
        raise HipError(
            hipError_t.hipErrorInvalidValue,
            f"a send ticket must be {_TICKET_BYTES} bytes, not {type(secret).__name__}"
            f" of length {len(secret) if isinstance(secret, bytes) else '?'}",
        )
    return hashlib.blake2b(secret, digest_size=20, person=b"hipipc.ticket").hexdigest()


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
        "allocation holds one descriptor, every interprocess event one (two until exported), "
        "in the creator and in each process that opened it: export or free allocations, "
        "destroy events, or raise the hard limit (ulimit -Hn)",
    )


def _os_call(action: str, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
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


def _no_space(exc: OSError, what: str, path: str) -> HipError:
    """ENOSPC/EDQUOT as ``hipErrorOutOfMemory``, saying whether bytes or inodes ran out (a
    tmpfs mounted with nr_inodes=N runs out of files while it still has bytes)."""
    why = f"{exc.strerror} (the tmpfs behind the store is full or too small)"
    try:
        fs = os.statvfs(path)
        if fs.f_files and fs.f_favail == 0:
            why = (
                f"no free inodes: the file system behind {path} holds at most {fs.f_files} "
                "files (tmpfs nr_inodes); free or close other segments, or remount it "
                "with more inodes"
            )
    except OSError:
        pass
    return HipError(hipError_t.hipErrorOutOfMemory, f"{what} in {path}: {why}")


def _user_name(uid: int) -> str:
    try:
        import pwd

        return f" ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return ""


def _not_a_dir_reason(path: str) -> str:
    """Why ``path`` (or a directory above it) cannot be opened as a directory."""
    if os.path.islink(path):
        return "a symbolic link"
    if os.path.lexists(path):
        return "not a directory"
    return "a path component above it is not a directory"


def _same_live_dir(old: int, new: int) -> bool:
    """Whether two directory descriptors name the same directory, still linked in."""
    a, b = os.fstat(old), os.fstat(new)
    return a.st_nlink > 0 and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class HandleStore(Transport):
    """One namespace of exported segments: the directory ``template`` names.

    ``template`` (default ``$HIPIPC_STORE`` or ``/dev/shm/hipipc-{uid}``) may contain
    ``{uid}``, expanded to the exporter's uid, so that an importer finds the directory from the
    handle alone.  Directory descriptors are cached (``O_PATH``: an importer cannot open a 0711
    directory for reading) and reopened once when a lookup misses, since a store can be
    removed and recreated.
    """

    name: ClassVar[str] = "store"
    keeps_published: ClassVar[bool] = False  # the name keeps the file alive

    def __init__(self, template: str | None = None) -> None:
        self.template = template or os.environ.get(STORE_ENV) or DEFAULT_STORE
        self._paths: dict[int, str] = {}  # uid -> directory (path_for)
        self._dirs: dict[str, int] = {}
        self._retired: list[int] = []  # replaced directory descriptors, closed by close()
        self._lock = threading.Lock()
        self._swept = False
        # Set by the exit rule before it revokes: a name linked later (a daemon thread still
        # exporting at exit) would outlive the process, so publish, tickets and recreating the
        # store are refused from then on (hipErrorDeinitialized, CUDA's "driver shutting down").
        self.exiting = False

    # -- directories ---------------------------------------------------------------------

    def path_for(self, uid: int) -> str:
        """The store directory holding segments exported by ``uid``."""
        path = self._paths.get(uid)
        if path is None:  # cached: open asks on every call
            path = self._paths[uid] = self.template.replace("{uid}", str(uid))
        return path

    def _refuse(self, path: str, why: str, importing: bool, owner: int | None = None) -> HipError:
        code = (
            hipError_t.hipErrorInvalidResourceHandle
            if importing
            else hipError_t.hipErrorOperatingSystem
        )
        if owner is None:
            fix = f"remove it or set ${STORE_ENV} to another path"
        else:
            # Anyone may create /dev/shm/hipipc-<uid> first (a denial of service the sticky
            # /dev/shm does not prevent); its victim cannot remove it but can move away.
            fix = (
                f"only uid {owner} or root can remove it; meanwhile set ${STORE_ENV} to a "
                "path of your own, the same for exporters and importers, e.g. "
                f"{STORE_ENV}=/dev/shm/hipipc-{{uid}}-{os.urandom(3).hex()}"
            )
        return HipError(
            code,
            f"refusing handle store {path}: {why}. A store must be a real directory owned by "
            f"its user (or by root), not readable or writable by others; {fix}",
        )

    def _verify_dir(self, fd: int, path: str, owner: int, importing: bool) -> None:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            raise self._refuse(path, "not a directory", importing)
        if st.st_uid not in (owner, 0):
            raise self._refuse(
                path,
                f"owned by uid {st.st_uid}{_user_name(st.st_uid)}, expected {owner} or root",
                importing,
                owner=st.st_uid,
            )
        mode = stat.S_IMODE(st.st_mode)
        admin_shared = st.st_uid == 0 and mode & stat.S_ISVTX
        forbidden = 0o044 if admin_shared else 0o066
        if mode & forbidden:
            raise self._refuse(path, f"mode {mode:04o} lets others list or write it", importing)

    def _open_dir(self, path: str, owner: int, importing: bool) -> int:
        """Open (an exporter: create if missing) and verify the store at ``path``.

        The one place a store is opened: a store removed between mkdir and open (another
        process's exit cleanup) is created again, a bounded number of times.
        """
        for _ in range(_STORE_ATTEMPTS):
            try:
                fd = _os_call("opening the handle store", os.open, path, _DIR_FLAGS)
            except FileNotFoundError:
                if importing:
                    raise
                self._make_dir(path)
                continue
            except NotADirectoryError:
                raise self._refuse(path, _not_a_dir_reason(path), importing) from None
            except PermissionError as exc:
                raise self._refuse(
                    path, f"uid {os.geteuid()} cannot reach it ({exc.strerror})", importing
                ) from None
            except OSError as exc:
                raise self._refuse(path, f"cannot open it ({exc.strerror})", importing) from None
            try:
                self._verify_dir(fd, path, owner, importing)
                # mkdir's mode is filtered by the umask; set 0711 through the descriptor's
                # magic link (O_PATH descriptors cannot be fchmod'ed) so no path race can
                # redirect the chmod.
                if path in _created and _created[path][0] == os.getpid():
                    st = os.fstat(fd)
                    if (st.st_dev, st.st_ino) == _created[path][1:] and stat.S_IMODE(
                        st.st_mode
                    ) != 0o711:
                        os.chmod(f"/proc/self/fd/{fd}", 0o711)
            except BaseException:
                os.close(fd)
                raise
            return fd
        raise HipError(
            hipError_t.hipErrorOperatingSystem,
            f"the handle store {path} was removed {_STORE_ATTEMPTS} times while "
            "this process was creating it; something keeps removing it",
        )

    def _make_dir(self, path: str) -> None:
        """Create the store (mode 0700 until verified, then 0711); an existing one is fine."""
        self._refuse_if_exiting()
        parent = os.path.dirname(path) or "."
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
        except FileNotFoundError:
            raise HipError(
                hipError_t.hipErrorOperatingSystem,
                f"cannot create handle store {path}: {parent} does not exist "
                f"(is /dev/shm mounted?); create it or set ${STORE_ENV} to a path "
                "in an existing directory",
            ) from None
        except NotADirectoryError:
            raise HipError(
                hipError_t.hipErrorOperatingSystem,
                f"cannot create handle store {path}: {_not_a_dir_reason(parent)}; "
                f"set ${STORE_ENV} to a path in a directory",
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(exc, "cannot create the handle store", parent) from None
            raise HipError(
                hipError_t.hipErrorOperatingSystem,
                f"cannot create handle store {path}: {exc.strerror} (uid "
                f"{os.geteuid()} must be able to write {parent}); set "
                f"${STORE_ENV} to a path in a directory you can write",
            ) from None
        try:
            _remember_created(path, os.lstat(path))
        except OSError:
            pass  # removed at once by someone else: the caller opens (or recreates) it

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

    def _in_own_store(self, fn: Callable[[int], _T]) -> _T:
        """``fn(dir_fd)`` in this user's store; if the store vanished under it (ENOENT: another
        process's exit cleanup removed it), reopen or recreate the store and call again."""
        fresh = False
        for _ in range(_STORE_ATTEMPTS):
            dfd = self._dir_fd(os.geteuid(), importing=False, fresh=fresh)
            try:
                return fn(dfd)
            except FileNotFoundError:
                fresh = True
        raise HipError(
            hipError_t.hipErrorOperatingSystem,
            f"the handle store {self.own_path()} was removed {_STORE_ATTEMPTS} "
            "times during one operation; something keeps removing it",
        )

    def diagnose(self) -> str | None:
        """What makes this user's store unusable, with the fix, or None if it is usable (or
        simply not created yet and creatable).  Never creates anything."""
        path = self.own_path()
        try:
            os.close(self._open_dir(path, os.geteuid(), importing=True))
            return None
        except HipError as exc:
            return exc.detail
        except FileNotFoundError:
            pass
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            why = "does not exist" if not os.path.lexists(parent) else "is not a directory"
            return (
                f"cannot create handle store {path}: {parent} {why}; set ${STORE_ENV} "
                "to a path in an existing directory"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            return (
                f"cannot create handle store {path}: uid {os.geteuid()} cannot write "
                f"{parent}; set ${STORE_ENV} to a path in a directory you can write"
            )
        return None

    def own_path(self) -> str:
        return self.path_for(os.geteuid())

    # -- exporter side -------------------------------------------------------------------

    def new_segment(
        self, handle_type: type[_H], kind: HandleKind, size: int, device: int
    ) -> tuple[_H, int]:
        """A fresh handle and its unnamed segment (:meth:`create`)."""
        handle = handle_type.new(kind, size, device, os.geteuid())
        return handle, self.create(handle, size)

    def create(self, handle: IpcHandle, payload_size: int) -> int:
        """Create the unnamed segment for ``handle`` and return its descriptor.

        Reserves ``payload_size`` bytes after the header with ``posix_fallocate`` so a full
        tmpfs fails here with ``hipErrorOutOfMemory``, never with SIGBUS on first touch.  The
        file has mode 0600 and no name; it vanishes with its last descriptor and mapping.
        """
        flags = os.O_TMPFILE | os.O_RDWR | _O_CLOEXEC
        try:
            # The cached store may have been removed (another process's exit cleanup, an
            # admin): _in_own_store recreates it, verified as usual.
            fd = self._in_own_store(
                lambda dfd: _os_call("creating a segment", os.open, ".", flags, 0o600, dir_fd=dfd)
            )
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(exc, "cannot create a segment", self.own_path()) from exc
            raise HipError(
                hipError_t.hipErrorOperatingSystem,
                f"cannot create a segment in {self.own_path()}: {exc.strerror} "
                "(the store must be on a filesystem with O_TMPFILE, e.g. tmpfs)",
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
                if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM, errno.EDQUOT):
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
            self._swept = True
            try:
                self.collect()
            except (OSError, HipError):
                # The sweep is opportunistic and must never fail the export: at the fd limit
                # (EMFILE) exporting is what gives an unexported allocation's descriptor back.
                pass
        os.fchmod(fd, mode)
        source, name = f"/proc/self/fd/{fd}", handle.segment_name
        try:
            # os.link only uses linkat(AT_SYMLINK_FOLLOW) when a dir_fd is given; plain link(2)
            # does not follow the /proc magic link and fails with EXDEV.  A store removed
            # under this process (an admin's cleanup, systemd-logind's RemoveIPC, another
            # process's exit) is recreated, verified as usual, and the link made there.
            self._in_own_store(lambda dfd: os.link(source, name, dst_dir_fd=dfd))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(exc, "cannot export a segment", self.own_path()) from exc
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _fd_exhausted("exporting a segment") from exc
            raise HipError(
                hipError_t.hipErrorOperatingSystem,
                f"cannot export a segment into {self.own_path()}: {exc.strerror}",
            ) from exc
        self._unlink_if_exiting(name)

    def remove_if_empty(self) -> None:
        """At exit (the registry's exit rule calls this after revoking the process's exports):
        remove the stores this process created if nothing is left in them.  The atexit hook
        of :func:`_remember_created` is a fallback for a process whose registry never ran."""
        _remove_created_stores()

    def issue_ticket(self, handle: IpcHandle) -> tuple[bytes, str]:
        """Link the exported segment of ``handle`` under a fresh ticket: (secret, name).

        Raises ``hipErrorInvalidResourceHandle`` if the segment has no name any more.
        """
        secret = secrets.token_bytes(_TICKET_BYTES)
        name = ticket_name(secret)
        dfd = self._dir_fd(os.geteuid(), importing=False)
        try:
            os.link(
                handle.segment_name, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False
            )
        except FileNotFoundError:
            raise HipError(
                hipError_t.hipErrorInvalidResourceHandle,
                "cannot send the memory: its export was revoked (freed, or the process is exiting)",
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(exc, "cannot link a send ticket", self.own_path()) from exc
            raise HipError(
                hipError_t.hipErrorOperatingSystem,
                f"cannot link a send ticket in {self.own_path()}: {exc.strerror}",
            ) from exc
        self._unlink_if_exiting(name)
        return secret, name

    def _unlink_if_exiting(self, name: str) -> None:
        """After a link: if the exit rule started meanwhile, take the name back and refuse.
        Checked after the link, not before, so that an export the rule's revocation may have
        missed is always undone here (the rule sets ``exiting`` before it looks)."""
        if self.exiting:
            self.discard(name)
            self._refuse_if_exiting()

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

    def revoke(self, handle: IpcHandle) -> None:
        """Remove the segment's name: later opens fail, open mappings stay valid."""
        dfd = self._dir_fd(os.geteuid(), importing=False)
        try:
            os.unlink(handle.segment_name, dir_fd=dfd)
        except FileNotFoundError:
            pass

    # -- importer side -------------------------------------------------------------------

    def open(self, handle: IpcHandle, ticket: bytes | None = None) -> int:
        """Open the segment ``handle`` names and return its descriptor (``O_RDWR``).

        Never creates.  First, before the store is touched, the handle's node tag must be this
        process's (:func:`hipipc.handle.node_tag`): a handle exported on another node (a real
        one, or a simulated one of :mod:`hipipc.mpi`) is refused as such, since no store here
        could hold it.  Then, on the opened descriptor (no TOCTOU): a regular file owned by
        the handle's uid with no mode bits beyond 0666, long enough, and a header whose
        identity equals the handle's, compared in constant time.  Raises
        ``hipErrorInvalidResourceHandle`` when no such segment exists (never exported, freed,
        exporter gone) or it may not be opened, with the reason.  A segment whose exporter was
        killed is refused too ("the exporter exited") and its name unlinked where this user
        may (its own store).

        ``ticket`` (a send-and-drop pickle's secret): open through the ticket's name, falling
        back to the main name if the ticket was consumed already, and unlink the ticket.
        """
        if handle.node != node_tag():
            raise HipError(
                hipError_t.hipErrorInvalidResourceHandle,
                f"the handle was exported on another node (node tag {handle.node:#06x}, this "
                f"process runs on {node_tag():#06x}); memory and events are shared only "
                f"within a node: move data between nodes with MPI (hipipc.mpi), or give every "
                f"process of one node the same ${NODE_ENV}",
            )
        name = segment = handle.segment_name
        names = [name] if ticket is None else [ticket_name(ticket), name]
        dfd = self._dirs.get(self._paths.get(handle.uid) or self.path_for(handle.uid))
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
                raise HipError(
                    hipError_t.hipErrorInvalidResourceHandle,
                    f"the segment is not a regular file of uid {handle.uid} with "
                    f"an expected mode (uid {st.st_uid}, mode {st.st_mode:o})",
                )
            # One pread for the identity and the exporter: the liveness check costs no read.
            raw = os.pread(fd, _HEADER_SIZE, 0) if st.st_size >= PAGE_SIZE + handle.size else b""
            if len(raw) < _HEADER_SIZE or not hmac.compare_digest(
                raw[: _IDENTITY.size], _identity(handle)
            ):
                raise HipError(
                    hipError_t.hipErrorInvalidResourceHandle,
                    "the segment does not match the handle",
                )
            pid, pidns, start, _ = _EXPORTER.unpack_from(raw, _IDENTITY.size)
            # Fast path inline (open's cost is benchmarked): a cached exporter whose pidfd is
            # not readable is alive.  Any other answer takes the careful path.
            hit = _liveness.cache.get((pid, start, pidns))
            if (hit is None or hit[1].poll(0)) and self._exporter_dead(raw, st, fd):
                self._reclaim(handle, names, dfd, st.st_uid)
                raise HipError(
                    hipError_t.hipErrorInvalidResourceHandle,
                    f"the exporter (pid {pid}) exited without freeing: its memory "
                    "died with it, as in CUDA",
                )
        except BaseException:
            os.close(fd)
            raise
        if name != segment and st.st_uid == os.geteuid():
            try:  # the ticket is consumed: the descriptor holds the file until it is mapped
                os.unlink(name, dir_fd=dfd)
            except OSError:
                pass
        return fd

    @staticmethod
    def _exporter_dead(raw: bytes, st: os.stat_result, fd: int) -> bool:
        """Whether the exporter the header ``raw`` names has exited, believed only where the
        header can be trusted: exporter fields a grantee rewrote (out of range, another uid)
        never make a segment dead, and a segment others may write is dead only when no
        process maps it (:func:`exporter_gone`), so nobody can get a live export reclaimed."""
        pid, pidns, start, _ = _EXPORTER.unpack_from(raw, _IDENTITY.size)
        # A live exporter (an open's first sight of it) answers before the header is parsed:
        # with its fields in the ranges parse() accepts, its liveness decides alone.
        in_range = 0 < pid < _PID_LIMIT and 0 <= start < _START_LIMIT
        if in_range and _liveness.alive(pid, start, pidns):
            return False
        info = SegmentInfo.parse(raw)
        if info is None or untrusted_reason(info, st) is not None:
            return False
        if _liveness.alive(info.pid, info.start_time, info.pid_namespace):
            return False
        return exporter_gone(info, st, [], fd)

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
                        return (
                            _os_call("opening a handle", os.open, name, _IMPORT_FLAGS, dir_fd=dfd),
                            name,
                            dfd,
                        )
                    raise self._open_error(handle, exc, dfd) from None
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

    def _open_error(self, handle: IpcHandle, exc: OSError, dfd: int | None) -> HipError:
        if exc.errno == errno.EACCES:
            st = None
            if dfd is not None:  # None: the store itself could not be opened, not the segment
                try:
                    st = os.stat(handle.segment_name, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    pass
            if st is not None and st.st_mode & 0o060 == 0o060:
                # The exporter already shared it with its group: opting in is not the fix.
                return HipError(
                    hipError_t.hipErrorInvalidResourceHandle,
                    f"permission denied: the segment of uid {handle.uid} is shared with "
                    f"group {st.st_gid} only, and uid {os.geteuid()} is not a member",
                )
            return HipError(
                hipError_t.hipErrorInvalidResourceHandle,
                f"permission denied: the segment belongs to uid {handle.uid} and is not "
                f"shared with uid {os.geteuid()}; the exporter can opt in with "
                f"{SHARE_ENV}=group or {SHARE_ENV}=all",
            )
        if exc.errno == errno.ELOOP:
            # The store is fine; one name in it is not a segment (someone with write access
            # to the store planted it).
            return HipError(
                hipError_t.hipErrorInvalidResourceHandle,
                "the segment this handle names is a symbolic link, not a segment "
                f"file (planted in {self.path_for(handle.uid)} by someone who "
                "can write the store?); refusing to follow it",
            )
        return HipError(
            hipError_t.hipErrorInvalidResourceHandle, f"cannot open the segment: {exc.strerror}"
        )

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
                    fd = os.open(
                        entry.name,
                        os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC,
                        dir_fd=dfd,
                    )
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

    def collect(
        self, skipped: list[tuple[str, str]] | None = None, *, dry_run: bool = False
    ) -> list[str]:
        """Unlink this user's segments whose exporter has exited (``hipipc gc``); with
        ``dry_run``, only name them (``hipipc gc --dry-run``).

        A process is identified by pid and start time, so a reused pid does not keep a dead
        exporter's segments alive, nor does it get a live exporter's segments removed.  A
        segment whose header cannot be trusted is kept and, with its reason, appended to
        ``skipped`` (see :func:`untrusted_reason`).
        """
        removed: list[str] = []
        if not os.path.isdir(self.own_path()):
            return removed  # nothing exported yet; do not create a store just to sweep it
        try:
            dfd = self._dir_fd(os.geteuid(), importing=False)
        except HipError:
            return removed
        uid = os.geteuid()
        mapped: list[set[tuple[int, int]]] = []
        for name, info, st in list(self.entries()):
            if info is None or st.st_uid != uid:
                continue
            problem = untrusted_reason(info, st)
            if problem is not None:
                if skipped is not None:
                    skipped.append((name, problem))
                continue
            if not self._gone(name, dfd, info, st, mapped):
                continue
            if dry_run:
                removed.append(name)
                continue
            try:
                os.unlink(name, dir_fd=dfd)
                removed.append(name)
            except OSError:
                pass
        return removed

    @staticmethod
    def _gone(
        name: str,
        dfd: int,
        info: SegmentInfo,
        st: os.stat_result,
        mapped: list[set[tuple[int, int]]],
    ) -> bool:
        """:func:`exporter_gone`, for a shared segment asked through a descriptor of it (the
        kernel then knows whether any process still holds it, /proc maps hidden or not)."""
        if not st.st_mode & 0o022:
            return exporter_gone(info, st, mapped)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return False  # gone or replaced meanwhile: not ours to judge now
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                return False
            return exporter_gone(info, st, mapped, fd)
        finally:
            os.close(fd)

    def forget(self) -> None:
        """In a forked child: a fresh lock (another thread of the parent may have held it),
        and the inherited directory descriptors closed, cleared from the cache first."""
        self._lock = threading.Lock()
        fds = [*self._dirs.values(), *self._retired]
        self._dirs, self._retired = {}, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        """Drop the cached directory descriptors (no other thread may be using the store)."""
        with self._lock:
            fds, self._dirs = list(self._dirs.values()), {}
            fds += self._retired
            self._retired = []
        for fd in fds:
            os.close(fd)
