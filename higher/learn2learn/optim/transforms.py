"""learn2learn's ``optim.transforms``: factories of learnable gradient transforms.

A transform factory is called on each parameter and returns the ``nn.Module``
that maps that parameter's gradient to its update;
:class:`~higher.learn2learn.optim.ParameterUpdate`,
:class:`~higher.learn2learn.optim.LearnableOptimizer` and ``GBML`` call them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._paths import missing

__all__ = [
    "KroneckerTransform",
    "MetaCurvatureTransform",
    "ModuleTransform",
    "ReshapedTransform",
    "TransformDictionary",
]

# learn2learn's module paths below this one (``optim.transforms.*``) are made by ``_paths``.
__path__: list[str] = []


class ReshapedTransform(nn.Module):
    """Applies ``transform`` to a gradient viewed as ``shape``, then restores its shape.

    Example:
        >>> t = ReshapedTransform(nn.Identity(), shape=(1, -1))
        >>> t(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, transform: nn.Module, shape: Sequence[int]) -> None:
        super().__init__()
        self.transform = transform
        self.in_shape = tuple(shape)

    def forward(self, grad: Tensor) -> Tensor:
        """The transformed gradient, in ``grad``'s shape."""
        return self.transform(grad.reshape(self.in_shape)).reshape(grad.shape)


class ModuleTransform:
    """A transform factory: a ``module_cls(numel, numel)`` on each flattened gradient.

    Args:
        module_cls: a module class taking ``(in_features, out_features)``, such
            as ``nn.Linear``.

    Example:
        >>> ModuleTransform(nn.Linear)(torch.zeros(2, 3)).transform
        Linear(in_features=6, out_features=6, bias=True)
    """

    def __init__(self, module_cls: Callable[[int, int], nn.Module]) -> None:
        self.module_cls = module_cls

    def __call__(self, parameter: Tensor) -> ReshapedTransform:
        numel = parameter.numel()
        return ReshapedTransform(self.module_cls(numel, numel), shape=(1, numel))


def kronecker_dims(param: Tensor) -> tuple[int, int]:
    """The ``(n, m)`` a parameter's gradient is viewed as by :class:`KroneckerTransform`."""
    shape = param.shape
    if len(shape) == 2:  # a linear layer's weight
        return shape[0], shape[1]
    if len(shape) == 1:  # a bias
        return shape[0], 1
    if len(shape) == 4:  # a convolution's weight
        return shape[1], shape[2] * shape[3]
    raise ValueError(
        f"KroneckerTransform: parameters of {len(shape)} dimensions (shape {tuple(shape)}) are "
        "not supported; it takes 1, 2 or 4. Map such parameters to None or another transform "
        "with TransformDictionary"
    )


class KroneckerTransform:
    """A transform factory: a Kronecker-factored linear map of each gradient.

    Args:
        kronecker_cls: a class such as
            :class:`~higher.learn2learn.nn.KroneckerLinear`, taking ``(n, m,
            bias=..., psd=...)``.
        bias: give the map a bias.
        psd: keep the factors positive semi-definite.

    Example:
        >>> from higher.learn2learn.nn import KroneckerLinear
        >>> t = KroneckerTransform(KroneckerLinear)(torch.zeros(4, 3))
        >>> t(torch.ones(4, 3)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self, kronecker_cls: Callable[..., nn.Module], bias: bool = False, psd: bool = True
    ) -> None:
        self.kronecker_cls = kronecker_cls
        self.bias = bias
        self.psd = psd

    def __call__(self, param: Tensor) -> ReshapedTransform:
        n, m = kronecker_dims(param)
        transform = self.kronecker_cls(n=n, m=m, bias=self.bias, psd=self.psd)
        return ReshapedTransform(transform, shape=(-1, n, m))


class MetaCurvatureTransform(nn.Module):
    """Meta-Curvature's learned preconditioner of one parameter's gradient.

    A bias's gradient is scaled elementwise, a weight matrix's is multiplied
    by a learned matrix on each side, and a convolution's gradient by one per
    dimension (output channels, input channels, kernel), all starting as the
    identity. The result is multiplied by ``lr``.

    Args:
        param: the parameter whose gradients it transforms (1, 2 or 4 dimensions).
        lr: the factor applied to the update.

    Example:
        >>> t = MetaCurvatureTransform(torch.zeros(3, 2))
        >>> torch.equal(t(torch.ones(3, 2)), torch.ones(3, 2))
        True
    """

    def __init__(self, param: Tensor, lr: float = 1.0) -> None:
        super().__init__()
        self.lr = lr
        shape = param.shape
        self.dim = len(shape)
        if self.dim == 1:
            self.mc = nn.Parameter(torch.ones_like(param))
        elif self.dim == 2:
            self.mc_in = nn.Parameter(torch.eye(shape[0]))
            self.mc_out = nn.Parameter(torch.eye(shape[1]))
        elif self.dim == 4:
            self.n_in, self.n_out = shape[0], shape[1]
            self.n_f = math.prod(shape[2:])
            self.mc_in = nn.Parameter(torch.eye(self.n_in))
            self.mc_out = nn.Parameter(torch.eye(self.n_out))
            self.mc_f = nn.Parameter(torch.eye(self.n_f))
        else:
            raise ValueError(
                f"MetaCurvatureTransform: parameters of {self.dim} dimensions (shape "
                f"{tuple(shape)}) are not supported; it takes 1, 2 or 4"
            )

    def forward(self, grad: Tensor) -> Tensor:
        """The preconditioned gradient, times ``lr``."""
        if self.dim == 1:
            update = self.mc * grad
        elif self.dim == 2:
            update = self.mc_in @ grad @ self.mc_out
        else:
            # grad[a, b, f] (f the flattened kernel) -> sum over a', b', f' of
            # mc_in[a, a'] * grad[a', b', f'] * mc_out[b', b] * mc_f[f, f'].
            g = grad.reshape(self.n_in, self.n_out, self.n_f)
            update = torch.einsum("ij,jkl,km,nl->imn", self.mc_in, g, self.mc_out, self.mc_f)
            update = update.reshape(grad.shape)
        return self.lr * update


class TransformDictionary:
    """A transform factory choosing the transform per parameter or per module.

    Args:
        dictionary: maps a module (each of its parameters) or a parameter to
            a transform factory; other parameters get None (their gradient).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> pick = TransformDictionary({model[0]: ModuleTransform(nn.Linear)})
        >>> [pick(p) is None for p in model.parameters()]
        [False, False, True, True]
    """

    def __init__(self, dictionary: Mapping[Any, Callable[..., Any]]) -> None:
        self.param_to_transform: dict[int, Callable[..., Any]] = {}
        for key, transform in dictionary.items():
            if isinstance(key, nn.Module):
                for p in key.parameters():
                    self.param_to_transform[id(p)] = transform
            elif isinstance(key, nn.Parameter):
                self.param_to_transform[id(key)] = transform
            else:
                raise ValueError(
                    "TransformDictionary: keys must be modules or parameters, got "
                    f"{type(key).__name__}"
                )

    def __call__(self, param: Tensor, *args: Any, **kwargs: Any) -> Any:
        transform = self.param_to_transform.get(id(param))
        return None if transform is None else transform(param, *args, **kwargs)


#: learn2learn's name for :func:`kronecker_dims`.
get_kronecker_dims = kronecker_dims


def __getattr__(name: str) -> Any:
    return missing(__name__, name)
