"""ResNet-12 (Mishra et al., 2018; MetaOptNet's variant, Lee et al., 2019), as learn2learn 0.2.0 has it.

Module names, registration order (hence ``state_dict`` keys and the order in
which a seed initialises the weights), the draws of dropout and DropBlock
from torch's generator, and the arithmetic are learn2learn's, so that the
same weights (and, in training mode, the same seed) give the same outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..nn import Flatten, Lambda

__all__ = ["BasicBlock", "DropBlock", "ResNet12", "ResNet12Backbone", "conv3x3"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al., 2018): zeroes ``block_size`` squares around random seeds.

    In training mode, seeds are drawn with probability ``gamma`` over the
    positions where a whole block fits, each seed drops a block starting at it
    (with learn2learn's pairing of seeds and offsets, see ``_compute_block_mask``),
    and the output is rescaled by the number of entries over the number kept,
    as in learn2learn (and MetaOptNet).
    The identity in evaluation mode.
    """

    def __init__(self, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size

    def forward(self, x: Tensor, gamma: float) -> Tensor:
        """``x`` with blocks dropped (training mode only)."""
        if not self.training:
            return x
        size = self.block_size
        batch, channels, height, width = x.shape
        seeds = torch.distributions.Bernoulli(gamma).sample(
            (batch, channels, height - (size - 1), width - (size - 1))
        )
        block_mask = self._compute_block_mask(seeds.to(x.device))
        return block_mask * x * (block_mask.numel() / block_mask.sum())

    def _compute_block_mask(self, seeds: Tensor) -> Tensor:
        size = self.block_size
        left, right = (size - 1) // 2, size // 2
        dropped = F.pad(seeds, (left, right, left, right))
        where = seeds.nonzero()
        count = where.shape[0]
        if count:
            # Seed k % count gets offset k % size**2 within its block, for k below
            # count * size**2: learn2learn's pairing (MetaOptNet's), which covers every
            # offset of every seed only when count and size**2 are coprime.
            k = torch.arange(count * size * size, device=seeds.device)
            at, offset = where[k % count], k % (size * size)
            dropped[at[:, 0], at[:, 1], at[:, 2] + offset // size, at[:, 3] + offset % size] = 1.0
        return 1 - dropped


class BasicBlock(nn.Module):
    """Three 3x3 conv-BN layers with LeakyReLU(0.1), a residual, max-pooling, then
    dropout (``drop_block=False``) or DropBlock with a rate that ramps up."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        drop_rate: float = 0.0,
        drop_block: bool = False,
        block_size: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.LeakyReLU(0.1)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv3x3(planes, planes)
        self.bn3 = nn.BatchNorm2d(planes)
        self.maxpool = nn.MaxPool2d(stride)
        self.downsample = downsample
        self.stride = stride
        self.drop_rate = drop_rate
        # Forward calls so far, train or eval: DropBlock's rate grows with them.
        self.num_batches_tracked = 0
        self.drop_block = drop_block
        self.block_size = block_size
        self.DropBlock = DropBlock(block_size=block_size)

    def forward(self, x: Tensor) -> Tensor:
        """The block's output."""
        self.num_batches_tracked += 1
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        out = self.maxpool(self.relu(out))
        if self.drop_rate > 0:
            if self.drop_block:
                size, block = out.size()[2], self.block_size
                keep_rate = max(
                    1.0 - self.drop_rate / 40000 * self.num_batches_tracked, 1.0 - self.drop_rate
                )
                gamma = (1 - keep_rate) / block**2 * size**2 / (size - block + 1) ** 2
                out = self.DropBlock(out, gamma=gamma)
            else:
                out = F.dropout(out, p=self.drop_rate, training=self.training, inplace=True)
        return out


class ResNet12Backbone(nn.Module):
    """ResNet-12's features: four residual blocks, pooled and flattened.

    Args:
        avg_pool: average-pool the last 5x5 map (640 features for 84x84 inputs);
            False keeps it (16000 features).
        wider: filters (64, 160, 320, 640) as MetaOptNet; False (64, 128, 256,
            512) as TADAM.
        embedding_dropout: dropout on the features.
        dropblock_dropout: dropout rate of the blocks (DropBlock in the last two).
        dropblock_size: DropBlock's block size.
        channels: input channels.

    Example:
        >>> ResNet12Backbone()(torch.randn(2, 3, 84, 84)).shape
        torch.Size([2, 640])
    """

    def __init__(
        self,
        avg_pool: bool = True,
        wider: bool = True,
        embedding_dropout: float = 0.0,
        dropblock_dropout: float = 0.1,
        dropblock_size: int = 5,
        channels: int = 3,
    ) -> None:
        super().__init__()
        self.inplanes = channels
        filters = [64, 160, 320, 640] if wider else [64, 128, 256, 512]
        for i, planes in enumerate(filters, start=1):
            late = i > 2  # DropBlock in the last two blocks, dropout in the first two
            layer = self._make_layer(
                BasicBlock,
                planes,
                stride=2,
                dropblock_dropout=dropblock_dropout,
                drop_block=late,
                block_size=dropblock_size if late else 1,
            )
            self.add_module(f"layer{i}", layer)
        self.avgpool: nn.Module = nn.AvgPool2d(5, stride=1) if avg_pool else Lambda(_identity)
        self.flatten = Flatten()
        self.embedding_dropout = embedding_dropout
        self.keep_avg_pool = avg_pool
        self.dropout = nn.Dropout(p=embedding_dropout, inplace=False)
        self.dropblock_dropout = dropblock_dropout
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self,
        block: Any,
        planes: int,
        stride: int = 1,
        dropblock_dropout: float = 0.0,
        drop_block: bool = False,
        block_size: int = 1,
    ) -> nn.Sequential:
        downsample = None
        width = planes * block.expansion
        if stride != 1 or self.inplanes != width:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, width, kernel_size=1, stride=1, bias=False),
                nn.BatchNorm2d(width),
            )
        layer = block(
            self.inplanes, planes, stride, downsample, dropblock_dropout, drop_block, block_size
        )
        self.inplanes = width
        return nn.Sequential(layer)

    def forward(self, x: Tensor) -> Tensor:
        """The features, one row per input."""
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.dropout(self.flatten(self.avgpool(x)))


def _identity(x: Tensor) -> Tensor:
    return x


class ResNet12(nn.Module):
    """ResNet-12 with a linear classifier: ``classifier(features(x))``.

    Args:
        output_size: the number of classes.
        hidden_size: the number of features (640 with ``avg_pool`` on 84x84
            inputs, 16000 without).
        avg_pool: as in :class:`ResNet12Backbone`, and so are the others.
        wider: see :class:`ResNet12Backbone`.
        embedding_dropout: see :class:`ResNet12Backbone`.
        dropblock_dropout: see :class:`ResNet12Backbone`.
        dropblock_size: see :class:`ResNet12Backbone`.
        channels: see :class:`ResNet12Backbone`.

    Example:
        >>> ResNet12(output_size=5)(torch.randn(2, 3, 84, 84)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        output_size: int,
        hidden_size: int = 640,
        avg_pool: bool = True,
        wider: bool = True,
        embedding_dropout: float = 0.0,
        dropblock_dropout: float = 0.1,
        dropblock_size: int = 5,
        channels: int = 3,
    ) -> None:
        super().__init__()
        self.features = ResNet12Backbone(
            avg_pool=avg_pool,
            wider=wider,
            embedding_dropout=embedding_dropout,
            dropblock_dropout=dropblock_dropout,
            dropblock_size=dropblock_size,
            channels=channels,
        )
        self.classifier = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        """The class scores."""
        return self.classifier(self.features(x))
