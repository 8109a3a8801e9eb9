"""``higher.learn2learn.vision``: the models, Omniglot from a folder and its tasksets.

The models are compared with learn2learn 0.2.0's (same parameter names and
order, same outputs from the same weights) when its venv is present; Omniglot
is read from a small folder generated in ``tmp_path``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import pathlib
import pickle
import random
import sys
import zipfile

import pytest
import torch

import higher.learn2learn as l2l
from higher.learn2learn.data import DataDescription, MetaDataset
from higher.learn2learn.vision import benchmarks, datasets, models
from higher.learn2learn.vision.transforms import RandomClassRotation

HAS_PIL = importlib.util.find_spec("PIL") is not None
needs_pil = pytest.mark.skipif(not HAS_PIL, reason="reading Omniglot's PNGs needs Pillow")

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

# (constructor, args, input shape); small sizes keep the test fast.
MODELS = {
    "OmniglotFC": ("OmniglotFC", "(28 * 28, 5, [16, 8])", (4, 1, 28, 28)),
    "OmniglotCNN": ("OmniglotCNN", "(5, hidden_size=8)", (4, 1, 28, 28)),
    "OmniglotCNN-3": ("OmniglotCNN", "(3, 8, 3)", (4, 784)),
    "CNN4": ("CNN4", "(5, hidden_size=8)", (2, 3, 84, 84)),
    "MiniImagenetCNN": ("MiniImagenetCNN", "(4, 8, channels=1)", (2, 1, 84, 84)),
    "CNN4-nopool": ("CNN4", "(5, 8, max_pool=False, embedding_size=288)", (2, 3, 84, 84)),
}


def build(case):
    cls, args, shape = MODELS[case]
    return eval(f"models.{cls}{args}"), shape


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


# -- models ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(MODELS))
def test_models_run_and_backpropagate(case):
    model, shape = build(case)
    out = model(torch.randn(shape))
    assert out.dim() == 2 and out.shape[0] == shape[0]
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    clone = copy.deepcopy(model)
    again = pickle.loads(pickle.dumps(model))
    x = torch.randn(shape)
    assert torch.equal(clone(x), model(x)) and torch.equal(again(x), model(x))


def test_model_structure():
    cnn = models.OmniglotCNN(5, hidden_size=8)
    assert cnn.hidden_size == 8 and cnn.classifier.out_features == 5
    assert cnn.features[1] is cnn.base and len(cnn.base) == 4
    assert torch.equal(cnn.classifier.bias, torch.zeros(5))
    fc = models.OmniglotFC(784, 5)
    assert [b.linear.out_features for b in fc.features[1]] == [256, 128, 64, 64]
    assert fc.input_size == 784
    block = fc.features[1][0].normalize
    assert (block.momentum, block.eps, block.track_running_stats) == (0.999, 1e-3, False)
    cnn4 = models.CNN4(5)
    assert cnn4.classifier.in_features == 25 * 64 and models.MiniImagenetCNN is models.CNN4
    assert isinstance(cnn4.features[0].max_pool, torch.nn.MaxPool2d)
    assert models.CNN4Backbone(layers=2)[0].max_pool.kernel_size == (4, 4)  # factor 4 // layers
    strided = models.ConvBlock(1, 4, 3, max_pool=False)
    assert strided.conv.stride == (2, 2) and isinstance(strided.max_pool, torch.nn.Identity)
    assert models.ConvBase()[0].conv.in_channels == 1  # Omniglot's defaults


def test_initialisers():
    layer = models.fc_init_(torch.nn.Linear(200, 200))
    assert layer.weight.abs().max() <= 0.02 and torch.equal(layer.bias, torch.zeros(200))
    assert 0.006 < layer.weight.std() < 0.01  # N(0, 0.01) truncated at two deviations
    conv = models.maml_init_(torch.nn.Conv2d(3, 8, 3))
    bound = (6 / (3 * 9 + 8 * 9)) ** 0.5  # Xavier uniform
    assert conv.weight.abs().max() <= bound and torch.equal(conv.bias, torch.zeros(8))
    block = models.ConvBlock(1, 16, 3)
    assert block.normalize.weight.min() >= 0 and block.normalize.weight.max() <= 1  # uniform


_VISION_FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "learn2learn_vision"


@pytest.fixture(scope="module")
def resnet_records():
    """Ours, and learn2learn 0.2.0's as recorded by fixtures/learn2learn_vision/record_vision.py."""
    sys.path.insert(0, str(_VISION_FIXTURES))
    try:
        import cases
    finally:
        sys.path.remove(str(_VISION_FIXTURES))
    theirs = torch.load(_VISION_FIXTURES / "record.pt")
    return cases.record(l2l), theirs


def test_resnet12_and_wrn28_match_learn2learn(resnet_records):
    # Same state-dict layout, and the same outputs for the same weights in float64:
    # evaluation mode, training mode (batch statistics; dropout and DropBlock draw the
    # same numbers from the same seed), and evaluation on the running statistics left.
    ours, theirs = resnet_records
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        if key.endswith("/layout"):
            assert ours[key] == value, key
        else:
            torch.testing.assert_close(ours[key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_fc_init_draws_from_numpys_generator_as_learn2learn():
    np = pytest.importorskip("numpy")
    truncnorm = pytest.importorskip("scipy.stats").truncnorm
    np.random.seed(42)
    expected = torch.from_numpy(0.01 * truncnorm.rvs(-2, 2, size=(4, 3))).float()
    np.random.seed(42)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    layer = torch.nn.Linear(3, 4)  # nn.Linear's own init draws from torch, as in learn2learn
    after_linear = torch.random.get_rng_state()
    models.fc_init_(layer)
    assert torch.equal(layer.weight, expected) and not layer.bias.any()
    assert torch.equal(torch.random.get_rng_state(), after_linear)  # fc_init_ draws no torch
    assert not torch.equal(state, after_linear)


def test_resnet_module_paths_and_pretrained_backbones(tmp_path):
    assert models.resnet12.ResNet12 is models.ResNet12
    assert models.wrn28.WRN28Backbone is models.WRN28Backbone
    with pytest.raises(FileNotFoundError, match=r"load_state_dict\(torch.load"):
        models.get_pretrained_backbone("resnet12", "mini-imagenet", root=str(tmp_path))
    with pytest.raises(NotImplementedError, match="Downloading is out of scope"):
        models.get_pretrained_backbone("wrn28", "mini-imagenet", root=str(tmp_path), download=True)
    with pytest.raises(ValueError, match="no weights for model='resnet18'"):
        models.get_pretrained_backbone("resnet18", "mini-imagenet")
    # Weights already on disk load, as in learn2learn.
    torch.manual_seed(0)
    saved = models.CNN4Backbone(channels=3, max_pool=True)
    folder = tmp_path / "pretrained_models" / "cifar-fs"
    folder.mkdir(parents=True)
    torch.save(saved.state_dict(), folder / "cnn4.pth")
    loaded = models.get_pretrained_backbone("cnn4", "cifar-fs", root=str(tmp_path))
    for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(AttributeError):
        models.NoSuchModel  # noqa: B018


# -- Omniglot from a folder --------------------------------------------------------------
def write_omniglot(root, split="images_background", alphabets=2, characters=3, drawings=4, first=0):
    """Characters as black bars on white, the bar's row set by the character's number."""
    from PIL import Image

    number = first
    for a in range(alphabets):
        for c in range(characters):
            folder = root / split / f"Alphabet_{a}" / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(drawings):
                pixels = bytearray([255] * 105 * 105)
                row = 5 + 6 * number
                for r in range(row, row + 5):
                    pixels[r * 105 + 10 : r * 105 + 90] = bytes(80)
                Image.frombytes("L", (105, 105), bytes(pixels)).save(
                    folder / f"{number}_{d:02d}.png"
                )
            number += 1
    return number


def identify(image, references):
    """The (character, quarter turns) whose reference image, rotated, is exactly ``image``."""
    return [
        (c, k)
        for c, ref in enumerate(references)
        for k in range(4)
        if torch.equal(torch.rot90(ref, k, (-2, -1)), image)
    ]


@needs_pil
def test_full_omniglot_reads_the_layout(tmp_path):
    write_omniglot(tmp_path)
    data = datasets.FullOmniglot(str(tmp_path))
    assert len(data) == 24 and len(data.characters) == 6
    image, label = data[5]
    assert image.size == (105, 105) and image.mode == "L" and label == 1
    meta = MetaDataset(data)  # labels without reading the images
    assert meta.labels == list(range(6)) and meta.labels_to_indices[2] == [8, 9, 10, 11]


@needs_pil
def test_full_omniglot_evaluation_set_and_torchvision_folder(tmp_path):
    n = write_omniglot(tmp_path / "omniglot-py", alphabets=1, characters=2)
    write_omniglot(
        tmp_path / "omniglot-py", "images_evaluation", alphabets=1, characters=3, first=n
    )
    data = datasets.FullOmniglot(
        str(tmp_path), transform=lambda im: im.size, target_transform=lambda y: 10 * y
    )
    assert len(data) == 20 and data[8] == ((105, 105), 20)  # evaluation numbered after
    assert data.characters[2].startswith("images_evaluation")
    assert MetaDataset(data).labels == [0, 10, 20, 30, 40]


def test_full_omniglot_is_offline_unless_asked(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("downloaded without download=True")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", no_network)
    with pytest.raises(FileNotFoundError, match="no Omniglot folder.*download=True"):
        datasets.FullOmniglot(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no Omniglot folder"):
        benchmarks.get_tasksets("omniglot", root=str(tmp_path))


@needs_pil
def test_full_omniglot_download_checks_and_extracts(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_omniglot(source, alphabets=1, characters=2, drawings=2)
    write_omniglot(source, "images_evaluation", alphabets=1, characters=1, drawings=2, first=2)
    md5 = {}
    for split in ("images_background", "images_evaluation"):
        archive = source / f"{split}.zip"
        with zipfile.ZipFile(archive, "w") as z:
            for path in sorted((source / split).rglob("*.png")):
                z.write(path, path.relative_to(source))
        md5[split] = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(datasets, "_URL", f"file://{source}/{{}}.zip")
    monkeypatch.setattr(datasets, "_MD5", md5)
    root = tmp_path / "data"
    data = datasets.FullOmniglot(str(root), download=True)
    assert len(data) == 6 and (root / "omniglot-py" / "images_evaluation").is_dir()
    assert len(datasets.FullOmniglot(str(root))) == 6  # offline from now on
    monkeypatch.setattr(datasets, "_MD5", {k: "0" * 32 for k in md5})
    with pytest.raises(RuntimeError, match="MD5 mismatch"):
        datasets.FullOmniglot(str(tmp_path / "other"), download=True)


def test_full_omniglot_without_pillow_names_it(tmp_path, monkeypatch):
    (tmp_path / "images_background").mkdir()
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="Pillow, which is not installed: pip install pillow"):
        datasets.FullOmniglot(str(tmp_path))


@pytest.mark.parametrize("name", ["MiniImagenet", "TieredImagenet", "CIFARFS", "FC100"])
def test_datasets_without_offline_path_are_refused(name):
    with pytest.raises(NotImplementedError, match="no offline path.*MetaDataset"):
        getattr(datasets, name)


@needs_pil
def test_omniglot_image_transform():
    pixels = bytearray([255] * 105 * 105)
    pixels[45 * 105 : 60 * 105] = bytes(15 * 105)  # a black band, rows 12 to 16 at 28x28
    from PIL import Image

    x = benchmarks._omniglot_image(Image.frombytes("L", (105, 105), bytes(pixels)))
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert x[0, 0].abs().max() < 1e-6 and x[0, 14].min() > 0.9  # ink high, background 0


# -- benchmark tasksets -----------------------------------------------------------------
@needs_pil
def test_get_tasksets_omniglot(tmp_path):
    write_omniglot(tmp_path, alphabets=3, characters=4)  # 12 characters of 4 drawings
    random.seed(1)
    tasksets = l2l.vision.benchmarks.get_tasksets(
        "omniglot", train_ways=3, train_samples=2, test_ways=1, test_samples=4, root=str(tmp_path)
    )
    train = tasksets[0]
    assert tasksets.train is train and isinstance(train, l2l.data.TaskDataset)
    classes = [set(ts.dataset.labels) for ts in tasksets]
    assert [len(c) for c in classes] == [8, 1, 3] and set.union(*classes) == set(range(12))
    x, y = train.sample()
    # The shots of each class are consecutive; the classes numbered 0-2 in a random order.
    labels = y.tolist()
    assert x.shape == (6, 1, 28, 28) and sorted(labels) == [0, 0, 1, 1, 2, 2]
    assert labels[0::2] == labels[1::2]
    data = datasets.FullOmniglot(str(tmp_path), transform=benchmarks._omniglot_image)
    references = [data[4 * c][0] for c in range(12)]  # the drawings of a character are alike
    rotations = set()
    for ts, (ways, shots), split in zip(tasksets, [(3, 2), (1, 4), (1, 4)], classes):
        for _ in range(8):
            x, y = ts.sample()
            assert x.shape[0] == ways * shots
            for label in range(ways):
                found = [identify(image, references) for image in x[y == label]]
                assert all(len(f) == 1 for f in found), "an image matches no character"
                assert len({f[0] for f in found}) == 1  # one character, rotated alike
                character, turns = found[0][0]
                assert character in split  # the split's own classes only
                rotations.add(turns)
    assert rotations == {0, 1, 2, 3}


@needs_pil
def test_get_tasksets_on_device_and_arguments(tmp_path):
    write_omniglot(tmp_path, alphabets=1, characters=3, drawings=2)
    tasksets = benchmarks.get_tasksets(
        "omniglot", 1, 2, 1, 2, num_tasks=2, root=str(tmp_path), device="cpu"
    )
    assert isinstance(tasksets.test.dataset.dataset.dataset, l2l.data.OnDeviceDataset)
    assert len(tasksets.validation) == 2
    with pytest.raises(NotImplementedError, match="mini-imagenet.*no offline path"):
        benchmarks.get_tasksets("mini-imagenet")
    with pytest.raises(ValueError, match="unknown benchmark 'imagenet'"):
        benchmarks.get_tasksets("imagenet")
    with pytest.raises(TypeError, match="unexpected arguments"):
        benchmarks.get_tasksets("omniglot", root=str(tmp_path), data_augmentation="x")
    with pytest.raises(ValueError, match="n=5 asks for more classes"):
        benchmarks.get_tasksets("omniglot", root=str(tmp_path))
    assert benchmarks.list_tasksets() == ["omniglot"]


# -- RandomClassRotation ---------------------------------------------------------------
def test_random_class_rotation_rotates_each_class_alike():
    images = torch.arange(16.0).view(4, 1, 2, 2)
    meta = MetaDataset(torch.utils.data.TensorDataset(images, torch.tensor([0, 0, 1, 1])))
    rotate = RandomClassRotation(meta, [0, 90, 180, 270])
    seen = set()
    for _ in range(40):
        task = rotate(l2l.data.transforms.LoadData(meta)([DataDescription(i) for i in range(4)]))
        out = [dd.transforms[1](dd.transforms[0](dd.index)) for dd in task]
        assert all(type(s) is tuple and len(s) == 2 for s in out)
        for first, second in ((0, 1), (2, 3)):
            k = [
                k
                for k in range(4)
                if torch.equal(torch.rot90(images[first], k, (-2, -1)), out[first][0])
            ]
            assert len(k) == 1 and torch.equal(
                torch.rot90(images[second], k[0], (-2, -1)), out[second][0]
            )
            seen.add(k[0])
    assert seen == {0, 1, 2, 3}
    quarter = RandomClassRotation(meta, [90])([DataDescription(0)])[0].transforms[0]
    assert quarter((torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 0))[0].tolist() == [
        [2.0, 4.0],
        [1.0, 3.0],
    ]
    with pytest.raises(ValueError, match="`degrees` is empty"):
        RandomClassRotation(meta, [])


@pytest.mark.skipif(HAS_TORCHVISION, reason="checks the error raised without torchvision")
def test_random_class_rotation_by_other_angles_names_torchvision():
    meta = MetaDataset(
        torch.utils.data.TensorDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]))
    )
    with pytest.raises(ImportError, match="45.0 degrees .*pip install torchvision"):
        RandomClassRotation(meta, [0, 45])
