"""higher: differentiate through training loops.

``monkeypatch`` turns a module into one that runs on fast weights,
``higher.optim`` takes differentiable optimizer steps, and ``innerloop_ctx``
ties the two together.
"""

from . import attention, batched, checkpoint, implicit, optim, patch, testing, utils
from .context import innerloop_ctx
from .optim import create_diff_optim, get_diff_optim, register_optim
from .patch import buffer_sync, make_functional, monkeypatch
from .utils import get_func_params

__version__ = "0.5.0"

__all__ = [
    "__version__",
    "attention",
    "batched",
    "buffer_sync",
    "checkpoint",
    "create_diff_optim",
    "get_diff_optim",
    "get_func_params",
    "implicit",
    "innerloop_ctx",
    "make_functional",
    "monkeypatch",
    "optim",
    "patch",
    "register_optim",
    "testing",
    "utils",
]
