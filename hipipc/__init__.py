"""hipipc: HIP/CUDA-style IPC memory handles for Python processes.

One process allocates (``hipMalloc``), exports a 64-byte handle (``hipIpcGetMemHandle``) and
sends its bytes anywhere; another opens it (``hipIpcOpenMemHandle``) and works on the same
memory, with no copy.  See ``hipipc.runtime`` for the calling convention.
"""

from . import (
    arrays,
    buffer,
    device,
    devtypes,
    errors,
    events,
    handle,
    hostmem,
    lasterror,
    mempool,
    runtime,
    streams,
    transport,
)
from ._version import __version__ as __version__
from .arrays import *  # noqa: F403
from .buffer import *  # noqa: F403
from .device import *  # noqa: F403
from .devtypes import *  # noqa: F403
from .errors import *  # noqa: F403
from .events import *  # noqa: F403
from .handle import *  # noqa: F403
from .hostmem import *  # noqa: F403
from .lasterror import *  # noqa: F403
from .mempool import *  # noqa: F403
from .runtime import *  # noqa: F403
from .streams import *  # noqa: F403
from .transport import *  # noqa: F403

__all__ = [
    *errors.__all__,
    *handle.__all__,
    *events.__all__,
    *streams.__all__,
    *runtime.__all__,
    *buffer.__all__,
    *transport.__all__,
    *devtypes.__all__,
    *device.__all__,
    *hostmem.__all__,
    *lasterror.__all__,
    *arrays.__all__,
    *mempool.__all__,
]

# Last: every public hip* function records the error it raises (hipGetLastError).
lasterror.record_errors(globals())
