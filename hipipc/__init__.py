"""hipipc: HIP/CUDA-style IPC memory handles for Python processes.

One process allocates (``hipMalloc``), exports a 64-byte handle (``hipIpcGetMemHandle``) and
sends its bytes anywhere; another opens it (``hipIpcOpenMemHandle``) and works on the same
memory, with no copy.  See ``hipipc.runtime`` for the calling convention.
"""

from . import arrays, buffer, errors, events, handle, runtime, streams, transport
from .arrays import *  # noqa: F403
from .buffer import *  # noqa: F403
from .errors import *  # noqa: F403
from .events import *  # noqa: F403
from .handle import *  # noqa: F403
from .runtime import *  # noqa: F403
from .streams import *  # noqa: F403
from .transport import *  # noqa: F403

__version__ = "0.1.0"

__all__ = [*errors.__all__, *handle.__all__, *events.__all__, *streams.__all__,
           *runtime.__all__, *buffer.__all__, *arrays.__all__, *transport.__all__]
