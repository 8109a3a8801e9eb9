"""learn2learn's ``nn``: small layers, Kronecker-factored layers and prototype classifiers.

Ordinary ``torch.nn`` modules, with nothing special to higher: they are patched
and cloned like any module. The Kronecker layers are the building blocks of
:class:`~higher.learn2learn.optim.KroneckerTransform`;
:class:`PrototypicalClassifier` is the head of prototypical networks.
:class:`ParameterTransform` and :class:`MetaModule` run a module on transformed
parameters (through :func:`torch.func.functional_call`, leaving the module's
own parameters in place).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._paths import missing
from ._refused import refuse

__all__ = [
    "Flatten",
    "KroneckerLSTM",
    "KroneckerLinear",
    "KroneckerRNN",
    "Lambda",
    "MetaModule",
    "ParameterTransform",
    "PrototypicalClassifier",
    "Scale",
    "freeze",
    "kronecker_addmm",
    "unfreeze",
]

# learn2learn's module paths below this one (``nn.*``) are made by ``_paths``.
__path__: list[str] = []

EPS = 1e-8


class Lambda(nn.Module):
    """A module whose forward is the function ``lmb``.

    Example:
        >>> Lambda(lambda x: 2 * x)(torch.ones(2))
        tensor([2., 2.])
    """

    def __init__(self, lmb: Callable[..., Any]) -> None:
        super().__init__()
        self.lmb = lmb

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Calls ``lmb`` with the same arguments."""
        return self.lmb(*args, **kwargs)


class Flatten(nn.Module):
    """Flattens every dimension but the first (the batch).

    Example:
        >>> Flatten()(torch.ones(2, 3, 4)).shape
        torch.Size([2, 12])
    """

    def forward(self, x: Tensor) -> Tensor:
        """``x`` reshaped to ``(batch, -1)``."""
        return x.reshape(x.size(0), -1)


class Scale(nn.Module):
    """Multiplies its input by a learned tensor ``alpha`` of ``shape``.

    Args:
        shape: the shape of ``alpha`` (an int: one dimension); ``(1,)`` when None.
        alpha: its initial value.

    Example:
        >>> Scale(2, alpha=3.0)(torch.ones(2))
        tensor([3., 3.], grad_fn=<MulBackward0>)
    """

    def __init__(self, shape: int | tuple[int, ...] | None = None, alpha: float = 1.0) -> None:
        super().__init__()
        if isinstance(shape, int):
            shape = (shape,)
        elif shape is None:
            shape = (1,)
        self.alpha = nn.Parameter(torch.full(shape, float(alpha)))

    def forward(self, x: Tensor) -> Tensor:
        """``x * alpha``."""
        return x * self.alpha


def freeze(module: nn.Module) -> nn.Module:
    """Makes every parameter of ``module`` stop requiring grad; returns ``module``.

    Example:
        >>> any(p.requires_grad for p in freeze(nn.Linear(2, 1)).parameters())
        False
    """
    for p in module.parameters():
        p.detach_()
        p.requires_grad_(False)
    return module


def unfreeze(module: nn.Module) -> nn.Module:
    """Makes every parameter of ``module`` require grad; returns ``module``.

    Example:
        >>> all(p.requires_grad for p in unfreeze(freeze(nn.Linear(2, 1))).parameters())
        True
    """
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def kronecker_addmm(
    mat1: Tensor,
    mat2: Tensor,
    mat3: Tensor,
    bias: Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> Tensor:
    """``alpha * mat1 @ mat3 @ mat2 + beta * bias``: ``(mat2^T kron mat1) vec(mat3)``, unflattened.

    Example:
        >>> kronecker_addmm(torch.eye(2), torch.eye(3), torch.ones(2, 3), alpha=2.0).sum()
        tensor(12.)
    """
    res = (mat1 @ mat3 @ mat2) * alpha
    if bias is not None:
        res = res + beta * bias
    return res


class KroneckerLinear(nn.Module):
    """A linear map of ``n x m`` inputs with Kronecker-factored weights: ``L @ X @ R + b``.

    It acts on a flattened input ``x`` (``n * m`` values, column-major) as
    ``(R^T kron L) x + b``, with ``n^2 + m^2`` parameters instead of
    ``(nm)^2``. ``L`` and ``R`` start as identities, ``b`` as zeros.

    Args:
        n: rows of the input.
        m: columns of the input.
        bias: learn a bias ``b`` of shape ``(n, m)``.
        psd: use ``L^T L`` and ``R^T R`` (positive semi-definite factors).
        device: where the parameters live; inputs are moved there and back.

    Example:
        >>> KroneckerLinear(2, 3)(torch.ones(5, 2, 3)).shape
        torch.Size([5, 2, 3])
    """

    def __init__(
        self, n: int, m: int, bias: bool = True, psd: bool = False, device: Any = None
    ) -> None:
        super().__init__()
        self.left = nn.Parameter(torch.eye(n, device=device))
        self.right = nn.Parameter(torch.eye(m, device=device))
        self.bias = nn.Parameter(torch.zeros(n, m, device=device)) if bias else None
        self.psd = psd
        self.device = device

    def forward(self, x: Tensor) -> Tensor:
        """``L @ X @ R + b`` for an ``(..., n, m)`` input; a flat input of ``n * m`` values is read
        column by column.
        """
        old_device = x.device
        if self.device is not None:
            x = x.to(self.device)
        left: Tensor = self.left
        right: Tensor = self.right
        if self.psd:
            left = left.t() @ left
            right = right.t() @ right
        n, m = self.left.size(0), self.right.size(0)
        if x.dim() == 1:
            if x.size(0) != n * m:
                raise ValueError(f"KroneckerLinear: an input vector must have n*m = {n * m} values")
            y = kronecker_addmm(left, right, x.reshape(m, n).t(), self.bias)
            return y.t().flatten().to(old_device)
        if x.shape[-2:] != (n, m):
            raise ValueError(
                f"KroneckerLinear: the last two dimensions of the input must be ({n}, {m}), "
                f"got {tuple(x.shape[-2:])}"
            )
        return kronecker_addmm(left, right, x, self.bias).to(old_device)


class KroneckerRNN(nn.Module):
    """An Elman RNN cell whose maps are :class:`KroneckerLinear`.

    ``h' = sigma(W_h x + U_h h)``, output ``W_y h'``; ``forward(x, h)`` returns
    ``(output, h')``.

    Args:
        n: rows of the inputs.
        m: columns of the inputs.
        bias: give the maps biases.
        sigma: the nonlinearity (``nn.Tanh()`` when None).

    Example:
        >>> out, h = KroneckerRNN(2, 3)(torch.ones(2, 3), torch.zeros(2, 3))
        >>> out.shape, h.shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
    """

    def __init__(self, n: int, m: int, bias: bool = True, sigma: nn.Module | None = None) -> None:
        super().__init__()
        self.W_h = KroneckerLinear(n, m, bias=bias)
        self.U_h = KroneckerLinear(n, m, bias=bias)
        self.W_y = KroneckerLinear(n, m, bias=bias)
        self.sigma = nn.Tanh() if sigma is None else sigma

    def forward(self, x: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """One step: ``(output, new_hidden)``."""
        new_hidden = self.sigma(self.W_h(x) + self.U_h(hidden))
        return self.W_y(new_hidden), new_hidden


class KroneckerLSTM(nn.Module):
    """An LSTM cell whose eight maps are :class:`KroneckerLinear`.

    ``forward(x, (h, c))`` returns ``(h', (h', c'))``.

    Args:
        n: rows of the inputs.
        m: columns of the inputs.
        bias: give the maps biases.
        sigma: the gates' nonlinearity (``nn.Sigmoid()`` when None).

    Example:
        >>> h, (h2, c) = KroneckerLSTM(2, 3)(torch.ones(2, 3), (torch.zeros(2, 3), torch.zeros(2, 3)))
        >>> h.shape, c.shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
    """

    def __init__(self, n: int, m: int, bias: bool = True, sigma: nn.Module | None = None) -> None:
        super().__init__()
        self.W_ii = KroneckerLinear(n, m, bias=bias)
        self.W_hi = KroneckerLinear(n, m, bias=bias)
        self.W_if = KroneckerLinear(n, m, bias=bias)
        self.W_hf = KroneckerLinear(n, m, bias=bias)
        self.W_ig = KroneckerLinear(n, m, bias=bias)
        self.W_hg = KroneckerLinear(n, m, bias=bias)
        self.W_io = KroneckerLinear(n, m, bias=bias)
        self.W_ho = KroneckerLinear(n, m, bias=bias)
        self.sigma = nn.Sigmoid() if sigma is None else sigma
        self.tanh = nn.Tanh()

    def forward(
        self, x: Tensor, hidden: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One step: ``(h', (h', c'))``."""
        h, c = hidden
        i = self.sigma(self.W_ii(x) + self.W_hi(h))
        f = self.sigma(self.W_if(x) + self.W_hf(h))
        g = self.tanh(self.W_ig(x) + self.W_hg(h))
        o = self.sigma(self.W_io(x) + self.W_ho(h))
        c = f * c + i * g
        h = o * self.tanh(c)
        return h, (h, c)


def compute_prototypes(support: Tensor, labels: Tensor) -> Tensor:
    """The mean embedding of each class, in the order of ``torch.unique(labels)``."""
    classes = torch.unique(labels)
    return torch.stack([support[labels == c].mean(dim=0) for c in classes])


class PrototypicalClassifier(nn.Module):
    """Classifies embeddings by their distance to class prototypes (prototypical networks).

    ``fit_(support, labels)`` sets one prototype per class, the mean of its
    support embeddings (differentiably); calling the classifier on queries
    returns ``-distance(prototypes, queries)``, one logit per class in the
    order of ``torch.unique(labels)``.

    Args:
        support: support embeddings ``(N, D)`` to fit on right away.
        labels: their labels ``(N,)``.
        distance: ``"euclidean"`` (squared), ``"cosine"`` (normalizes), or a
            function ``(prototypes, queries) -> (Q, C)`` distances.
        normalize: normalize prototypes and queries to unit length.

    Example:
        >>> support = torch.tensor([[0.0, 0.0], [4.0, 4.0]])
        >>> head = PrototypicalClassifier(support, torch.tensor([0, 1]))
        >>> head(torch.tensor([[1.0, 1.0]])).argmax(dim=1)
        tensor([0])
    """

    def __init__(
        self,
        support: Tensor | None = None,
        labels: Tensor | None = None,
        distance: str | Callable[[Tensor, Tensor], Tensor] = "euclidean",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        # As in learn2learn, the instance's flag shadows the static method, which is
        # reached through the class.
        self.normalize = normalize  # type: ignore[method-assign,assignment]
        self._compute_prototypes = compute_prototypes
        self.distance: Callable[[Tensor, Tensor], Tensor]
        if distance == "euclidean":
            self.distance = PrototypicalClassifier.euclidean_distance
        elif distance == "cosine":
            self.distance = PrototypicalClassifier.cosine_distance
            self.normalize = True  # type: ignore[method-assign,assignment]
        elif callable(distance):
            self.distance = distance
        else:
            raise ValueError(
                f"PrototypicalClassifier: distance must be 'euclidean', 'cosine' or a function, "
                f"got {distance!r}"
            )
        self.prototypes: Tensor | None = None
        if support is not None and labels is not None:
            self.fit_(support, labels)

    def fit_(self, support: Tensor, labels: Tensor) -> Tensor:
        """Sets (and returns) the prototypes: each class's mean support embedding."""
        prototypes = self._compute_prototypes(support, labels)
        if self.normalize:  # type: ignore[truthy-function]
            prototypes = PrototypicalClassifier.normalize(prototypes)
        self.prototypes = prototypes
        return prototypes

    @staticmethod
    def cosine_distance(prototypes: Tensor, queries: Tensor) -> Tensor:
        """``-queries @ prototypes^T`` (both already normalized)."""
        return -torch.mm(queries, prototypes.t())

    @staticmethod
    def euclidean_distance(prototypes: Tensor, queries: Tensor) -> Tensor:
        """Squared Euclidean distances, ``(num_queries, num_prototypes)``."""
        return (queries.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(dim=2)

    @staticmethod
    def normalize(x: Tensor, epsilon: float = EPS) -> Tensor:  # type: ignore[override]
        """``x`` divided by its rows' L2 norms (plus ``epsilon``)."""
        return x / (x.norm(p=2, dim=1, keepdim=True) + epsilon)

    def forward(self, x: Tensor) -> Tensor:
        """The logits of ``x``'s rows: minus their distances to the prototypes."""
        if self.prototypes is None:
            raise RuntimeError(
                "PrototypicalClassifier has no prototypes yet: call fit_(support, labels) first"
            )
        if self.normalize:  # type: ignore[truthy-function]
            x = PrototypicalClassifier.normalize(x)
        return -self.distance(self.prototypes, x)


class ParameterTransform(nn.Module):
    """Runs ``module`` with each parameter replaced by ``transform(param)``'s output.

    ``transform`` is called on each parameter once, at construction, and
    returns the module that maps it (its *meta-parameters*, listed by
    :meth:`meta_parameters`); ``module``'s own parameters are left in place.

    Args:
        module: the module to run.
        transform: called on each parameter; returns an ``nn.Module`` applied
            to that parameter at every forward.

    Example:
        >>> layer = ParameterTransform(nn.Linear(2, 1), lambda p: Scale(1, alpha=2.0))
        >>> torch.equal(layer(torch.ones(1, 2)), 2 * layer.module(torch.ones(1, 2)))
        True
    """

    def __init__(self, module: nn.Module, transform: Callable[[Tensor], nn.Module]) -> None:
        super().__init__()
        self.module = module
        self.transform = transform
        names = [name for name, _ in module.named_parameters()]
        # ModuleDict keys cannot hold dots.
        self.parameter_transforms = nn.ModuleDict(
            {n.replace(".", "-"): transform(p) for n, p in module.named_parameters()}
        )
        self._parameter_names = names

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs ``module`` on the transformed parameters."""
        params = dict(self.module.named_parameters())
        new = {
            n: self.parameter_transforms[n.replace(".", "-")](params[n])
            for n in self._parameter_names
        }
        return torch.func.functional_call(self.module, new, args, kwargs)

    def meta_parameters(self) -> Iterator[Tensor]:
        """The transforms' parameters."""
        yield from self.parameter_transforms.parameters()


class MetaModule(nn.Module):
    """Wraps the submodules of ``module`` whose type ``substitutions`` names.

    Each such submodule ``m`` is replaced, in place, by ``substitutions[type(m)](m)``
    (for instance a :class:`ParameterTransform`); with ``freeze_module`` the
    module's own parameters stop requiring grad, so that only the wrappers'
    meta-parameters (:meth:`meta_parameters`) are learned.

    Args:
        module: the module to wrap.
        substitutions: maps a module type to a function wrapping such modules.
        freeze_module: freeze ``module``'s parameters.

    Example:
        >>> wrap = {nn.Linear: lambda m: ParameterTransform(m, lambda p: Scale(1))}
        >>> meta = MetaModule(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), wrap)
        >>> len(list(meta.meta_parameters())), meta(torch.ones(1, 2)).shape
        (2, torch.Size([1, 2]))
    """

    def __init__(
        self,
        module: nn.Module,
        substitutions: Mapping[type, Callable[[nn.Module], nn.Module]],
        freeze_module: bool = True,
    ) -> None:
        super().__init__()
        self.substitutions = dict(substitutions)
        self.freeze_module = freeze_module
        self.wrapped_module = self._wrap(module)

    def _wrap(self, module: nn.Module) -> nn.Module:
        for name, child in list(module.named_children()):
            module._modules[name] = self._wrap(child)
        if self.freeze_module:
            for p in module._parameters.values():
                if p is not None:
                    p.requires_grad_(False)
        wrap = self.substitutions.get(type(module))
        return module if wrap is None else wrap(module)

    def _unwrap(self, module: nn.Module) -> nn.Module:
        base = module.module if isinstance(module, ParameterTransform) else module
        for name, child in list(base.named_children()):
            base._modules[name] = self._unwrap(child)
        return base

    def meta_parameters(self, module: nn.Module | None = None) -> Iterator[Tensor]:
        """The meta-parameters of every wrapper, depth first."""
        module = self.wrapped_module if module is None else module
        own = getattr(module, "meta_parameters", None)
        if own is not None and module is not self:
            yield from own()
        for child in module.children():
            yield from self.meta_parameters(child)

    def module(self) -> nn.Module:
        """The wrapped module with its wrappers removed (in place)."""
        return self._unwrap(self.wrapped_module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped module."""
        return self.wrapped_module(*args, **kwargs)


_SVM = (
    "MetaOptNet's SVM head needs the qpth QP solver, which is out of scope; use "
    "PrototypicalClassifier, or solve the QP with qpth or cvxpylayers in your own module"
)


def __getattr__(name: str) -> Any:
    if name == "SVClassifier":
        refuse("learn2learn.nn", name, _SVM)
    return missing(__name__, name)
