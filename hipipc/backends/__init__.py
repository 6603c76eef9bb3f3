"""Memory backends behind one interface (:class:`~hipipc.backends.base.Backend`).

``HIPIPC_BACKEND`` selects one: ``host`` (POSIX shared memory, always available), ``cupy`` (GPU
memory; not part of this release) or ``auto`` (the default: the best available, today host).
"""

from __future__ import annotations

import os

from ..errors import HipError, hipError_t, short_repr
from ..segstore import Transports
from ..store import HandleStore
from .base import Allocation, Backend, ImportedMemory, Region
from .host import HostBackend

__all__ = ["Backend", "Allocation", "ImportedMemory", "Region", "HostBackend", "create_backend"]

BACKEND_ENV = "HIPIPC_BACKEND"


def create_backend(store: HandleStore | Transports, name: str | None = None) -> Backend:
    """The backend ``name`` (default ``$HIPIPC_BACKEND`` or ``auto``) over ``store``.

    Raises ``HipError(hipErrorNotSupported)`` for a backend this build cannot provide and
    ``hipErrorInvalidValue`` for an unknown name.
    """
    choice = (name or os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    transports = store if isinstance(store, Transports) else Transports(store)
    if choice in ("host", "auto"):
        return HostBackend(transports)
    if choice == "cupy":
        raise HipError(
            hipError_t.hipErrorNotSupported,
            "the cupy (GPU) backend is not part of this release; "
            f"unset ${BACKEND_ENV} or set it to host",
        )
    raise HipError(
        hipError_t.hipErrorInvalidValue,
        f"${BACKEND_ENV}={short_repr(choice)}: expected host, cupy or auto",
    )
