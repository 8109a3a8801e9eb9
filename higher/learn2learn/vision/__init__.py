"""learn2learn's ``vision``: few-shot models, Omniglot and its benchmark tasksets.

:mod:`.models` holds learn2learn's Omniglot and mini-ImageNet networks,
:mod:`.datasets` reads Omniglot from a folder (downloading it only when asked),
:mod:`.benchmarks` builds Omniglot's train / validation / test tasksets, and
:mod:`.transforms` the per-class rotation they use. Nothing here needs
torchvision; reading images needs Pillow.
"""

from . import benchmarks, datasets, models, transforms

__all__ = ["benchmarks", "datasets", "models", "transforms"]
