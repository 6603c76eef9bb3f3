"""The SCM_RIGHTS fallback server of the fd transport (issue 13): a STUB.

fd-scm's module replaces this file at merge, with the same signatures (the shared design).
This stub carries no logic: nothing is ever offered, so :func:`fetch` always refuses, and the
fd transport works through ``pidfd_getfd`` alone.
"""

from __future__ import annotations

from .errors import HipError, hipError_t

__all__ = ["offer", "withdraw", "pending", "withdraw_all", "fetch"]


def offer(key: str, fd: int, share_mode: int, *, once: bool = False) -> None:
    """Make the file behind ``fd`` available under ``key`` (stub: does nothing)."""


def withdraw(key: str) -> None:
    """Revoke ``key``; unknown key: no-op (stub: does nothing)."""


def pending(key: str) -> bool:
    """Whether ``key`` is still offered (stub: never)."""
    return False


def withdraw_all() -> None:
    """The exit rule: withdraw everything and stop the server (stub: does nothing)."""


def fetch(pid: int, start: int, uid: int, key: str, timeout: float | None = 5.0) -> int:
    """Fetch the descriptor offered under ``key`` by process (``pid``, ``start``) of ``uid``
    (stub: always ``hipErrorInvalidResourceHandle``)."""
    raise HipError(
        hipError_t.hipErrorInvalidResourceHandle,
        f"the exporter (pid {pid}) offers no descriptor server in this build "
        "(pidfd_getfd is the only fd route)",
    )
