"""learn2learn's ``vision.datasets``: Omniglot, read from a folder, downloaded only when asked.

:class:`FullOmniglot` reads Omniglot's own layout
(``images_background/<alphabet>/<character>/*.png``, and
``images_evaluation/...`` when present) from ``root`` or from
``root/omniglot-py`` (where torchvision and learn2learn put it), so a folder
that ``examples/maml_fewshot.py --data-dir`` reads, or one learn2learn
downloaded, works as it is. It needs Pillow to decode the images, not
torchvision.

learn2learn's other datasets (mini-ImageNet, tiered-ImageNet, CIFAR-FS, FC100,
...) are downloaded from mirrors or Google Drive, and have no offline path:
asking for them raises ``NotImplementedError`` naming what to do instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
import zipfile
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from .._paths import missing

__all__ = ["FullOmniglot"]

# learn2learn's module paths below this one (``vision.datasets.*``) are made by ``_paths``.
__path__: list[str] = []

_SPLITS = ("images_background", "images_evaluation")
_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}.zip"
_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}

_ALTERNATIVE = (
    "it has no offline path here. Build the tasks from your own copy instead: a Dataset "
    "of (image, label) (e.g. torchvision.datasets.ImageFolder over the extracted images) "
    "wrapped in higher.learn2learn.data.MetaDataset, then TaskDataset with NWays, KShots, "
    "LoadData and RemapLabels"
)
_REFUSED = (
    "MiniImagenet",
    "TieredImagenet",
    "CIFARFS",
    "FC100",
    "VGGFlower102",
    "FGVCAircraft",
    "CUBirds200",
    "DescribableTextures",
    "Quickdraw",
    "FGVCFungi",
)


def __getattr__(name: str) -> Any:
    """Refuses learn2learn's datasets that have no offline path, naming the alternative."""
    if name in _REFUSED:
        raise NotImplementedError(
            f"higher.learn2learn.vision.datasets.{name} is not provided: {_ALTERNATIVE}"
        )
    return missing(__name__, name)


def _pil_image() -> Any:
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(
            "FullOmniglot reads PNG images with Pillow, which is not installed: "
            'pip install pillow (or pip install -e ".[examples]")'
        ) from err
    return Image


def _folder(root: str) -> str | None:
    """The folder holding Omniglot's split folders: ``root`` or ``root/omniglot-py``."""
    for candidate in (root, os.path.join(root, "omniglot-py")):
        if os.path.isdir(os.path.join(candidate, _SPLITS[0])):
            return candidate
    return None


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(root: str) -> str:
    """Downloads and extracts Omniglot's two splits into ``root/omniglot-py``; returns that folder.

    Each archive's MD5 is checked before it is extracted.
    """
    target = os.path.join(root, "omniglot-py")
    os.makedirs(target, exist_ok=True)
    for split in _SPLITS:
        if os.path.isdir(os.path.join(target, split)):
            continue
        archive = os.path.join(target, f"{split}.zip")
        if not os.path.exists(archive) or _md5(archive) != _MD5[split]:
            with urllib.request.urlopen(_URL.format(split)) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
            if _md5(archive) != _MD5[split]:
                raise RuntimeError(
                    f"FullOmniglot: the download of {split}.zip is corrupt (MD5 mismatch); "
                    f"delete {archive} and try again"
                )
        with zipfile.ZipFile(archive) as z:
            z.extractall(target)
    return target


class FullOmniglot(Dataset):
    """Omniglot's 1,623 characters (background and evaluation sets together), 20 drawings each.

    Samples are ``(image, label)``: the image a grayscale PIL image of
    105x105 (before ``transform``), the label the character's number.
    Characters are numbered in sorted order (alphabet, then character): the
    background set's first, then the evaluation set's. A folder with only
    ``images_background`` gives just those characters.

    Args:
        root: the folder holding ``images_background`` (and
            ``images_evaluation``), or holding ``omniglot-py`` with them.
        transform: applied to each image.
        target_transform: applied to each label.
        download: download Omniglot into ``root/omniglot-py`` when ``root``
            holds no copy. Without it, nothing is ever downloaded.

    Raises:
        FileNotFoundError: ``root`` holds no Omniglot folder and ``download`` is False.
        ImportError: Pillow is not installed.

    Example:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from higher.learn2learn.vision.datasets import FullOmniglot
        >>> root = tempfile.mkdtemp()
        >>> for c in ("a", "b"):
        ...     os.makedirs(os.path.join(root, "images_background", "Alphabet", c))
        ...     Image.new("L", (105, 105), 255).save(os.path.join(root, "images_background", "Alphabet", c, "1.png"))
        >>> data = FullOmniglot(root)
        >>> len(data), data[1][0].size, data[1][1]
        (2, (105, 105), 1)
    """

    def __init__(
        self,
        root: str,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        download: bool = False,
    ) -> None:
        self.root = os.path.expanduser(root)
        self.transform = transform
        self.target_transform = target_transform
        folder = _folder(self.root)
        if folder is None:
            if not download:
                raise FileNotFoundError(
                    f"FullOmniglot: no Omniglot folder under {self.root!r} (looked for "
                    "images_background/ there and in omniglot-py/); point `root` at a folder "
                    "in Omniglot's layout, or pass download=True to download it"
                )
            folder = _download(self.root)
        self._image = _pil_image()
        self._files: list[str] = []
        self._labels: list[int] = []
        self.characters: list[str] = []
        for split in _SPLITS:
            split_dir = os.path.join(folder, split)
            if not os.path.isdir(split_dir):
                continue
            for alphabet in sorted(os.listdir(split_dir)):
                a_dir = os.path.join(split_dir, alphabet)
                if not os.path.isdir(a_dir):
                    continue
                for character in sorted(os.listdir(a_dir)):
                    c_dir = os.path.join(a_dir, character)
                    if not os.path.isdir(c_dir):
                        continue
                    pngs = sorted(f for f in os.listdir(c_dir) if f.lower().endswith(".png"))
                    if not pngs:
                        continue
                    label = len(self.characters)
                    self.characters.append(os.path.join(split, alphabet, character))
                    self._files += [os.path.join(c_dir, f) for f in pngs]
                    self._labels += [label] * len(pngs)
        if not self._files:
            raise FileNotFoundError(f"FullOmniglot: no PNG images under {folder!r}")

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, item: int) -> tuple[Any, Any]:
        with self._image.open(self._files[item]) as raw:
            image = raw.convert("L")
        label: Any = self._labels[item]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def _sample_labels(self) -> list[Any]:
        """Every sample's label without reading the images (MetaDataset asks for it)."""
        if self.target_transform is None:
            return list(self._labels)
        return [self.target_transform(label) for label in self._labels]
