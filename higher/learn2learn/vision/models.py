"""learn2learn's few-shot vision models: the Omniglot MLP and the 4-block conv nets.

Same layers, initialisations, constructor signatures and parameter names as
learn2learn 0.2.0's ``vision.models``, so a ``state_dict`` saved from one loads
into the other, and ``parameters()`` come in the same order. The reshaping and
pooling steps that learn2learn writes as lambdas are small modules here, so
the models pickle and ``copy.deepcopy``. Every model's ``forward`` is
``classifier(features(x))``.

``ResNet12`` and ``WRN28`` (and their backbones) live in ``_resnet12`` and
``_wrn28``, with learn2learn's module names. :func:`get_pretrained_backbone`
loads weights already on disk, and refuses to download them.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import torch
from torch import nn

from .._paths import missing
from ._resnet12 import ResNet12, ResNet12Backbone
from ._wrn28 import WRN28, WRN28Backbone

__all__ = [
    "CNN4",
    "WRN28",
    "CNN4Backbone",
    "ConvBase",
    "ConvBlock",
    "MiniImagenetCNN",
    "OmniglotCNN",
    "OmniglotFC",
    "ResNet12",
    "ResNet12Backbone",
    "WRN28Backbone",
    "fc_init_",
    "get_pretrained_backbone",
    "maml_init_",
]

# learn2learn's module paths below this one (``vision.models.*``) are made by ``_paths``.
__path__: list[str] = []


def __getattr__(name: str) -> Any:
    return missing(__name__, name)


# learn2learn's sources of pretrained weights, by dataset and model (spec "default" and
# "supervised" are the same files).
_ZENODO = "https://zenodo.org/record/5651278/files/"
_BACKBONE_FILES = {
    ("mini-imagenet", "resnet12"): "25u1gtp5.pth",
    ("mini-imagenet", "wrn28"): "m8vz9plq.pth",
    ("tiered-imagenet", "resnet12"): "126od68s.pth",
    ("tiered-imagenet", "wrn28"): "2w8u50q4.pth",
    ("cifar-fs", "cnn4"): "2mbq7efr.pth",
}


def get_pretrained_backbone(
    model: str,
    dataset: str,
    spec: str = "default",
    root: str = "~/data",
    download: bool = False,
) -> nn.Module:
    """A backbone with learn2learn's pretrained weights, read from ``root``.

    The weights must already be at ``<root>/pretrained_models/<dataset>/<model>.pth``
    (where learn2learn downloads them): nothing is downloaded here.

    Args:
        model: ``"cnn4"``, ``"resnet12"`` or ``"wrn28"``.
        dataset: ``"mini-imagenet"``, ``"tiered-imagenet"`` or ``"cifar-fs"``.
        spec: ``"default"`` or ``"supervised"`` (the same weights).
        root: where the weights are.
        download: True is refused (no downloads).

    Returns:
        ``CNN4Backbone(channels=3, max_pool=True)``, ``ResNet12Backbone(avg_pool=False)``
        or ``WRN28Backbone()`` with the weights loaded.

    Raises:
        ValueError: an unknown model, dataset or spec.
        FileNotFoundError: the weights are not on disk (the message says where
            to put them and how to load a state dict yourself).
        NotImplementedError: ``download=True`` and the weights are not on disk.

    Example:
        >>> get_pretrained_backbone("resnet12", "mini-imagenet", root="/nonexistent")
        Traceback (most recent call last):
        ...
        FileNotFoundError: get_pretrained_backbone: ...
    """
    source = _BACKBONE_FILES.get((dataset, model))
    if source is None or spec not in ("default", "supervised"):
        raise ValueError(
            f"get_pretrained_backbone: no weights for model={model!r}, dataset={dataset!r}, "
            f"spec={spec!r}; known (dataset, model): {sorted(_BACKBONE_FILES)}, specs "
            "'default' and 'supervised'"
        )
    path = os.path.join(os.path.expanduser(root), "pretrained_models", dataset, model + ".pth")
    if not os.path.exists(path):
        how = (
            f"the weights are not at {path}. Downloading is out of scope here: fetch "
            f"{_ZENODO}{source} to that path, or load any state dict yourself: backbone = "
            f"{_BACKBONE_BUILDERS[model][0]}; backbone.load_state_dict(torch.load(file, "
            "map_location='cpu'))"
        )
        if download:
            raise NotImplementedError(f"get_pretrained_backbone(download=True): {how}")
        raise FileNotFoundError(f"get_pretrained_backbone: {how}")
    backbone = _BACKBONE_BUILDERS[model][1]()
    backbone.load_state_dict(torch.load(path, map_location="cpu"))
    return backbone


def fc_init_(module: nn.Module) -> nn.Module:
    """Initialises a linear layer in place: weights from N(0, 0.01²) truncated at two standard
    deviations (``truncated_normal_``: NumPy's generator, as learn2learn), bias 0.

    Example:
        >>> import torch
        >>> from higher.learn2learn.vision.models import fc_init_
        >>> layer = fc_init_(torch.nn.Linear(50, 50))
        >>> bool(layer.weight.abs().max() <= 0.02), layer.bias.abs().sum().item()
        (True, 0.0)
    """
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    with torch.no_grad():
        if weight is not None:
            truncated_normal_(weight, mean=0.0, std=0.01)
        if bias is not None:
            bias.zero_()
    return module


def maml_init_(module: nn.Module) -> nn.Module:
    """Initialises a layer in place as in MAML's code: Xavier-uniform weights, zero bias.

    Example:
        >>> import torch
        >>> from higher.learn2learn.vision.models import maml_init_
        >>> maml_init_(torch.nn.Conv2d(1, 4, 3)).bias.abs().sum().item()
        0.0
    """
    with torch.no_grad():
        nn.init.xavier_uniform_(module.weight, gain=1.0)  # type: ignore[arg-type]
        nn.init.zeros_(module.bias)  # type: ignore[arg-type]
    return module


def truncated_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Fills ``tensor`` in place from N(mean, std²) truncated at two standard deviations.

    As in learn2learn, the values come from SciPy's ``truncnorm`` on NumPy's
    global generator (``np.random.seed`` fixes them, torch's generator is not
    used), so a seeded program gets learn2learn's weights. Without SciPy they
    are drawn with torch's ``trunc_normal_`` instead (same distribution,
    other values).

    Example:
        >>> t = truncated_normal_(torch.empty(1000), std=0.5)
        >>> bool(t.abs().max() <= 1.0)
        True
    """
    try:
        from scipy.stats import truncnorm
    except ImportError:
        with torch.no_grad():
            return nn.init.trunc_normal_(tensor, mean, std, a=mean - 2 * std, b=mean + 2 * std)
    values = mean + std * truncnorm.rvs(-2, 2, size=tuple(tensor.shape))
    with torch.no_grad():
        return tensor.copy_(torch.from_numpy(values))


class LinearBlock(nn.Module):
    """Linear, BatchNorm (batch statistics only), ReLU: one layer of ``OmniglotFC``.

    Example:
        >>> LinearBlock(4, 3)(torch.randn(5, 4)).shape
        torch.Size([5, 3])
    """

    def __init__(self, input_size: int, output_size: int) -> None:
        super().__init__()
        # Registration order as learn2learn's, so parameters() come in its order.
        self.relu = nn.ReLU()
        self.normalize = nn.BatchNorm1d(
            output_size, affine=True, momentum=0.999, eps=1e-3, track_running_stats=False
        )
        self.linear = fc_init_(nn.Linear(input_size, output_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output."""
        return self.relu(self.normalize(self.linear(x)))


class ConvBlock(nn.Module):
    """3x3 convolution, BatchNorm, ReLU and, with ``max_pool``, max-pooling.

    With ``max_pool`` the convolution has stride 1 and a ``2 * max_pool_factor``
    pooling follows; without, the convolution itself has that stride.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: the convolution's kernel size.
        max_pool: downsample by max-pooling rather than by the convolution's stride.
        max_pool_factor: half the downsampling factor.

    Example:
        >>> import torch
        >>> from higher.learn2learn.vision.models import ConvBlock
        >>> ConvBlock(1, 8, 3)(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 8, 14, 14])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        max_pool: bool = True,
        max_pool_factor: float = 1.0,
    ) -> None:
        super().__init__()
        step = int(2 * max_pool_factor)
        stride = (step, step)
        self.max_pool: nn.Module
        if max_pool:
            self.max_pool = nn.MaxPool2d(kernel_size=stride, stride=stride, ceil_mode=False)
            stride = (1, 1)
        else:
            self.max_pool = nn.Identity()
        self.normalize = nn.BatchNorm2d(out_channels, affine=True)
        nn.init.uniform_(self.normalize.weight)
        self.relu = nn.ReLU()
        self.conv = maml_init_(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=1, bias=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output."""
        return self.max_pool(self.relu(self.normalize(self.conv(x))))


class ConvBase(nn.Sequential):
    """``layers`` :class:`ConvBlock` of 3x3 convolutions with ``hidden`` channels.

    Args:
        hidden: channels of every block.
        channels: input channels.
        max_pool: see :class:`ConvBlock`.
        layers: the number of blocks.
        max_pool_factor: see :class:`ConvBlock`.

    Example:
        >>> import torch
        >>> from higher.learn2learn.vision.models import ConvBase
        >>> ConvBase(hidden=8, layers=4)(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 8, 2, 2])
    """

    def __init__(
        self,
        hidden: int = 64,
        channels: int = 1,
        max_pool: bool = False,
        layers: int = 4,
        max_pool_factor: float = 1.0,
    ) -> None:
        blocks = [
            ConvBlock(channels if i == 0 else hidden, hidden, (3, 3), max_pool, max_pool_factor)
            for i in range(layers)
        ]
        super().__init__(*blocks)


class _Reshape(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` viewed in the shape."""
        return x.view(*self.shape)


class _SpatialMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over the two spatial dimensions."""
        return x.mean(dim=[2, 3])


class OmniglotFC(nn.Module):
    """The fully connected Omniglot network of Santoro et al. (2016).

    Flatten, then per hidden size a linear layer, BatchNorm (batch
    statistics) and ReLU, then a linear classifier.

    Args:
        input_size: input features (``28 * 28`` for Omniglot).
        output_size: outputs (ways).
        sizes: hidden layer sizes; ``[256, 128, 64, 64]`` when None.

    Example:
        >>> import torch
        >>> from higher.learn2learn.vision.models import OmniglotFC
        >>> OmniglotFC(28 * 28, 5, sizes=[32, 16])(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 5])
    """

    def __init__(self, input_size: int, output_size: int, sizes: list[int] | None = None) -> None:
        super().__init__()
        if sizes is None:
            sizes = [256, 128, 64, 64]
        widths = [input_size, *sizes]
        layers = nn.Sequential(*(LinearBlock(a, b) for a, b in itertools.pairwise(widths)))
        self.features = nn.Sequential(nn.Flatten(), layers)
        self.classifier = fc_init_(nn.Linear(sizes[-1], output_size))
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``classifier(features(x))``."""
        return self.classifier(self.features(x))


class OmniglotCNN(nn.Module):
    """The 4-block conv net of MAML's Omniglot experiments (Finn et al., 2017).

    Inputs are viewed as ``(-1, 1, 28, 28)``; strided 3x3 convolutions (no
    max-pooling), then the mean over the spatial positions and a linear
    classifier.

    Args:
        output_size: outputs (ways).
        hidden_size: channels of every block.
        layers: the number of blocks.

    Example:
        >>> import torch
        >>> from higher.learn2learn.vision.models import OmniglotCNN
        >>> OmniglotCNN(output_size=5, hidden_size=8)(torch.randn(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """

    def __init__(self, output_size: int = 5, hidden_size: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.base = ConvBase(hidden=hidden_size, channels=1, max_pool=False, layers=layers)
        self.features = nn.Sequential(
            _Reshape(-1, 1, 28, 28), self.base, _SpatialMean(), nn.Flatten()
        )
        self.classifier = nn.Linear(hidden_size, output_size, bias=True)
        with torch.no_grad():
            self.classifier.weight.normal_()
            self.classifier.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``classifier(features(x))``."""
        return self.classifier(self.features(x))


class CNN4Backbone(ConvBase):
    """The features of :class:`CNN4`: its conv blocks, flattened per example.

    Args:
        hidden_size: channels of every block.
        layers: the number of blocks.
        channels: input channels.
        max_pool: see :class:`ConvBlock`.
        max_pool_factor: see :class:`ConvBlock`; ``4 // layers`` when None.

    Example:
        >>> import torch
        >>> from higher.learn2learn.vision.models import CNN4Backbone
        >>> CNN4Backbone(hidden_size=8)(torch.randn(2, 3, 84, 84)).shape
        torch.Size([2, 200])
    """

    def __init__(
        self,
        hidden_size: int = 64,
        layers: int = 4,
        channels: int = 3,
        max_pool: bool = True,
        max_pool_factor: float | None = None,
    ) -> None:
        if max_pool_factor is None:
            max_pool_factor = 4 // layers
        super().__init__(
            hidden=hidden_size,
            layers=layers,
            channels=channels,
            max_pool=max_pool,
            max_pool_factor=max_pool_factor,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks' output, flattened per example."""
        x = super().forward(x)
        return x.reshape(x.size(0), -1)


class CNN4(nn.Module):
    """The 4-block conv net of mini-ImageNet experiments (Ravi and Larochelle, 2017).

    :class:`CNN4Backbone` then a linear classifier; for 84x84 inputs the
    features have ``25 * hidden_size`` entries. ``MiniImagenetCNN`` is the
    same class.

    Args:
        output_size: outputs (ways).
        hidden_size: channels of every block.
        layers: the number of blocks.
        channels: input channels.
        max_pool: see :class:`ConvBlock`.
        embedding_size: the classifier's input size; ``25 * hidden_size`` when None.

    Example:
        >>> import torch
        >>> from higher.learn2learn.vision.models import CNN4
        >>> CNN4(output_size=5, hidden_size=8)(torch.randn(2, 3, 84, 84)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        output_size: int,
        hidden_size: int = 64,
        layers: int = 4,
        channels: int = 3,
        max_pool: bool = True,
        embedding_size: int | None = None,
    ) -> None:
        super().__init__()
        if embedding_size is None:
            embedding_size = 25 * hidden_size
        self.features = CNN4Backbone(
            hidden_size=hidden_size,
            channels=channels,
            max_pool=max_pool,
            layers=layers,
            max_pool_factor=4 // layers,
        )
        self.classifier = maml_init_(nn.Linear(embedding_size, output_size, bias=True))
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``classifier(features(x))``."""
        return self.classifier(self.features(x))


MiniImagenetCNN = CNN4


_BACKBONE_BUILDERS: dict[str, tuple[str, Any]] = {
    "cnn4": (
        "CNN4Backbone(channels=3, max_pool=True)",
        lambda: CNN4Backbone(channels=3, max_pool=True),
    ),
    "resnet12": ("ResNet12Backbone(avg_pool=False)", lambda: ResNet12Backbone(avg_pool=False)),
    "wrn28": ("WRN28Backbone()", WRN28Backbone),
}
