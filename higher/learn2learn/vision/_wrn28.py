"""WRN-28-10, the wide residual network of Dhillon et al. (2020), as learn2learn 0.2.0 has it.

Module names and registration order (hence ``state_dict`` keys and what a seed
initialises) and the arithmetic are learn2learn's, so that the same weights
give the same outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["WRN28", "WRN28Backbone", "WideResNet", "conv3x3", "conv_init", "wide_basic"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution with padding 1 and a bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=True)


def conv_init(m: nn.Module) -> None:
    """Xavier-uniform (gain sqrt 2) convolutions with zero bias; BatchNorm at 1 and 0.

    learn2learn defines it and never calls it; so does this package.
    """
    name = type(m).__name__
    with torch.no_grad():
        if "Conv" in name:
            nn.init.xavier_uniform_(m.weight, gain=2**0.5)  # type: ignore[arg-type]
            nn.init.constant_(m.bias, 0)  # type: ignore[arg-type]
        elif "BatchNorm" in name:
            nn.init.constant_(m.weight, 1)  # type: ignore[arg-type]
            nn.init.constant_(m.bias, 0)  # type: ignore[arg-type]


class wide_basic(nn.Module):
    """A pre-activation residual block: BN-ReLU-conv, dropout, BN-ReLU-conv, plus a shortcut."""

    def __init__(self, in_planes: int, planes: int, dropout_rate: float, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=True)
            )

    def forward(self, x: Tensor) -> Tensor:
        """The block's output."""
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        out += self.shortcut(x)
        return out


class WideResNet(nn.Module):
    """A wide ResNet of ``depth`` = 6n+4 layers, widened ``widen_factor`` times; its
    features are average-pooled over 21x21 (84x84 inputs) and flattened.

    Raises:
        ValueError: ``depth`` is not 6n+4.
    """

    def __init__(self, depth: int, widen_factor: int, dropout_rate: float) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet: depth must be 6n+4 (28, 34, ...), got {depth}")
        self.in_planes = 16
        n = (depth - 4) // 6
        stages = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = conv3x3(3, stages[0])
        self.layer1 = self._wide_layer(wide_basic, stages[1], n, dropout_rate, stride=1)
        self.layer2 = self._wide_layer(wide_basic, stages[2], n, dropout_rate, stride=2)
        self.layer3 = self._wide_layer(wide_basic, stages[3], n, dropout_rate, stride=2)
        self.bn1 = nn.BatchNorm2d(stages[3], momentum=0.9)

    def _wide_layer(
        self,
        block: type[wide_basic],
        planes: int,
        num_blocks: int,
        dropout_rate: float,
        stride: int,
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, dropout_rate, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """The features, one row per input."""
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 21)
        return out.view(out.size(0), -1)


class WRN28Backbone(WideResNet):
    """WRN-28-10's features (640 for 84x84 inputs).

    Args:
        dropout: dropout rate inside the blocks.

    Example:
        >>> WRN28Backbone()(torch.randn(1, 3, 84, 84)).shape
        torch.Size([1, 640])
    """

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__(depth=28, widen_factor=10, dropout_rate=dropout)


class WRN28(nn.Module):
    """WRN-28-10 with a linear classifier: ``classifier(features(x))``.

    Args:
        output_size: the number of classes.
        hidden_size: the number of features (640 for 84x84 inputs).
        dropout: dropout rate inside the blocks.

    Example:
        >>> WRN28(output_size=5)(torch.randn(1, 3, 84, 84)).shape
        torch.Size([1, 5])
    """

    def __init__(self, output_size: int, hidden_size: int = 640, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = WRN28Backbone(dropout=dropout)
        self.classifier = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        """The class scores."""
        return self.classifier(self.features(x))
