"""higher: differentiate through training loops.

``monkeypatch`` turns a module into one that runs on fast weights,
``higher.optim`` takes differentiable optimizer steps, and ``innerloop_ctx``
ties the two together.
"""

from . import batched, optim, testing
from .context import innerloop_ctx
from .patch import buffer_sync, make_functional, monkeypatch
from .utils import get_func_params

__version__ = "0.3.0"

__all__ = [
    "__version__",
    "batched",
    "buffer_sync",
    "get_func_params",
    "innerloop_ctx",
    "make_functional",
    "monkeypatch",
    "optim",
    "testing",
]
