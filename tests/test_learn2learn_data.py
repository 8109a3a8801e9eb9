"""``higher.learn2learn.data``: learn2learn 0.2.0's task sampling, name by name.

Each name is checked against learn2learn's documented behaviour; the
deterministic parts (index maps, relabelling, ordering, support/query split)
are also compared with the real learn2learn when its Python 3.10 venv is
present (``../shared/learn2learn/venv.sh``; skipped otherwise, as in CI).
"""

from __future__ import annotations

import pickle
import random
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

import higher.learn2learn as l2l
from higher.learn2learn.data import (
    DataDescription,
    FilteredMetaDataset,
    InfiniteIterator,
    MetaDataset,
    OnDeviceDataset,
    TaskDataset,
    Taskset,
    UnionMetaDataset,
    partition_task,
)
from higher.learn2learn.data.task_dataset import _collate
from higher.learn2learn.data.transforms import (
    ConsecutiveLabels,
    FilterLabels,
    FusedNWaysKShots,
    KShots,
    LoadData,
    NWays,
    RemapLabels,
    TaskTransform,
)


class ListDataset(Dataset):
    """A dataset of given samples, without TensorDataset's shortcut (the generic path)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def toy(classes=4, per_class=3):
    """Sample i has input [i] and label i % classes."""
    n = classes * per_class
    return TensorDataset(torch.arange(float(n)).view(n, 1), torch.arange(n) % classes)


def labels_of(meta, description):
    return [meta.indices_to_labels[dd.index] for dd in description]


def run(description):
    out = []
    for dd in description:
        data = dd.index
        for fn in dd.transforms:
            data = fn(data)
        out.append(data)
    return out


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


# -- MetaDataset and its views ----------------------------------------------------------
def test_meta_dataset_maps_labels_and_indices():
    meta = MetaDataset(toy())
    assert meta.labels == [0, 1, 2, 3]
    assert meta.labels_to_indices == {0: [0, 4, 8], 1: [1, 5, 9], 2: [2, 6, 10], 3: [3, 7, 11]}
    assert meta.indices_to_labels[7] == 3 and len(meta.indices_to_labels) == 12
    assert all(type(label) is int for label in meta.labels)  # tensors keyed by value
    assert len(meta) == 12 and meta[5][0].item() == 5.0
    assert set(meta._bookkeeping) == {"labels_to_indices", "indices_to_labels", "labels"}


def test_meta_dataset_generic_path_equals_the_tensor_shortcut():
    data = toy()
    generic = MetaDataset(ListDataset([data[i] for i in range(len(data))]))
    fast = MetaDataset(data)
    assert generic.labels_to_indices == fast.labels_to_indices
    assert generic.indices_to_labels == fast.indices_to_labels
    assert generic.labels == fast.labels


def test_meta_dataset_labels_in_order_of_first_appearance_and_any_hashable():
    meta = MetaDataset(ListDataset([(0, "b"), (1, "a"), (2, "b")]))
    assert meta.labels == ["b", "a"] and meta.labels_to_indices == {"b": [0, 2], "a": [1]}


def test_meta_dataset_from_given_maps():
    meta = MetaDataset(toy(), labels_to_indices={0: [0, 4], 1: [1]})
    assert meta.labels == [0, 1] and meta.indices_to_labels == {0: 0, 4: 0, 1: 1}
    meta = MetaDataset(toy(), indices_to_labels={0: 5, 1: 6, 2: 5})
    assert meta.labels == [5, 6] and meta.labels_to_indices == {5: [0, 2], 6: [1]}


def test_meta_dataset_bad_input():
    with pytest.raises(TypeError, match="wraps a torch.utils.data.Dataset"):
        MetaDataset([(0, 1)])
    with pytest.raises(ValueError, match="one scalar label"):
        MetaDataset(ListDataset([(0, torch.tensor([1, 2]))]))
    with pytest.raises(ValueError, match="label tensor has shape"):
        MetaDataset(TensorDataset(torch.zeros(2), torch.zeros(2, 3)))


def test_meta_dataset_bookkeeping_file(tmp_path):
    class Cached(TensorDataset):
        _bookkeeping_path = str(tmp_path / "bk.pkl")

    data = toy()
    first = MetaDataset(Cached(*data.tensors))
    with open(Cached._bookkeeping_path, "rb") as f:
        saved = pickle.load(f)
    assert saved["labels_to_indices"] == first.labels_to_indices
    # A second instance reads the file (here doctored, to see it is read).
    saved["labels_to_indices"] = {9: [0, 1]}
    with open(Cached._bookkeeping_path, "wb") as f:
        pickle.dump(saved, f)
    again = MetaDataset(Cached(*data.tensors))
    assert again.labels == [9] and again.indices_to_labels == {0: 9, 1: 9}


def test_union_meta_dataset_renumbers_labels():
    a = MetaDataset(toy(classes=2, per_class=2))
    b = TensorDataset(torch.full((3, 1), -1.0), torch.tensor([5, 7, 5]))
    union = UnionMetaDataset([a, b])
    assert len(union) == 7 and union.labels == [0, 1, 2, 3]
    assert union.labels_to_indices == {0: [0, 2], 1: [1, 3], 2: [4, 6], 3: [5]}
    x, y = union[5]
    assert x.item() == -1.0 and y == 3
    assert union[-1][1] == 2 and union[1][1] == 1
    with pytest.raises(IndexError, match="out of range"):
        union[7]
    with pytest.raises(ValueError, match="at least one dataset"):
        UnionMetaDataset([])


def test_filtered_meta_dataset_keeps_labels_and_renumbers_samples():
    kept = FilteredMetaDataset(toy(), [3, 1])
    assert len(kept) == 6 and kept.labels == [3, 1]
    assert kept.labels_to_indices == {3: [0, 1, 2], 1: [3, 4, 5]}
    assert kept.to_true_indices == [3, 7, 11, 1, 5, 9]
    assert [kept[i][0].item() for i in range(6)] == [3.0, 7.0, 11.0, 1.0, 5.0, 9.0]
    with pytest.raises(ValueError, match=r"labels \[8\] are not in the dataset"):
        FilteredMetaDataset(toy(), [1, 8])


# -- task transforms -------------------------------------------------------------------
def test_data_description():
    dd = DataDescription(3)
    assert dd.index == 3 and dd.transforms == []
    assert "index=3" in repr(dd)


def test_task_transform_new_task_is_the_whole_dataset():
    meta = MetaDataset(toy())
    assert [d.index for d in TaskTransform(meta).new_task()] == list(range(12))


def test_nways_on_none_and_on_a_description():
    meta = MetaDataset(toy())
    task = NWays(meta, n=2)(None)
    labels = labels_of(meta, task)
    assert len(set(labels)) == 2 and len(task) == 6  # all samples of the two labels
    assert labels[:3] == [labels[0]] * 3  # label after label
    description = [DataDescription(i) for i in [3, 1, 7, 0, 5, 4]]  # labels 3 1 3 0 1 0
    kept = NWays(meta, n=2)(description)
    assert len(set(labels_of(meta, kept))) == 2
    assert [d.index for d in kept] == [d.index for d in description if d in kept]  # order kept
    assert NWays(meta).n == 2  # learn2learn's default


def test_kshots_on_none_and_on_a_description():
    meta = MetaDataset(toy())
    task = KShots(meta, k=2)(None)
    assert labels_of(meta, task) == [0, 0, 1, 1, 2, 2, 3, 3]
    description = [DataDescription(i) for i in [3, 1, 7, 11, 5]]  # labels 3 1 3 3 1
    kept = KShots(meta, k=2)(description)
    assert labels_of(meta, kept) == [3, 3, 1, 1]  # labels in order of first appearance
    assert all(any(d is e for e in description) for d in kept)  # the same descriptions
    assert KShots(meta).k == 1 and KShots(meta).replacement is False


def test_kshots_with_replacement_copies_each_draw():
    meta = MetaDataset(toy())
    first = DataDescription(0)
    first.transforms.append(str)
    task = KShots(meta, k=5, replacement=True)([first, DataDescription(4)])
    assert len(task) == 5 and len({id(d) for d in task}) == 5
    assert all(d.index in (0, 4) and d is not first for d in task)
    assert all(d.transforms == [str] for d in task if d.index == 0)
    task[0].transforms.append(repr)
    assert first.transforms == [str]  # copies, not aliases
    assert len(KShots(meta, k=7, replacement=True)(None)) == 28


def test_kshots_asking_for_more_samples_than_a_class_has():
    meta = MetaDataset(toy())
    with pytest.raises(ValueError, match=r"KShots: k=4 .* class 0, which has only 3; lower k"):
        KShots(meta, k=4)(None)
    with pytest.raises(ValueError, match=r"KShots: k=3 .*only 2.*replacement=True"):
        KShots(meta, k=3)([DataDescription(i) for i in (0, 4)])
    with pytest.raises(ValueError, match="KShots: `k` must be a positive int"):
        KShots(meta, k=0)
    with pytest.raises(ValueError, match=r"KShots: k=4 .*only 3"):
        TaskDataset(meta, [NWays(meta, 2), KShots(meta, 4), LoadData(meta)]).sample()


def test_nways_asking_for_more_classes_than_the_dataset_holds():
    meta = MetaDataset(toy())
    with pytest.raises(ValueError, match=r"NWays: n=5 .* than the dataset holds \(4\); lower n"):
        NWays(meta, n=5)
    with pytest.raises(ValueError, match=r"n=3 .* the task description holds \(2\)"):
        NWays(meta, n=3)([DataDescription(i) for i in (0, 1, 4)])
    with pytest.raises(ValueError, match="NWays: `n` must be a positive int"):
        NWays(meta, n=-1)
    with pytest.raises(ValueError, match=r"FusedNWaysKShots: n=3 .*filter_labels holds \(2\)"):
        FusedNWaysKShots(meta, n=3, filter_labels=[0, 1])


def test_transforms_need_a_meta_dataset():
    with pytest.raises(TypeError, match=r"NWays needs a MetaDataset.*MetaDataset\(dataset\)"):
        NWays(toy(), n=2)


def test_load_data_appends_the_loading():
    meta = MetaDataset(toy())
    task = LoadData(meta)([DataDescription(5)])
    ((x, y),) = run(task)
    assert x.item() == 5.0 and y.item() == 1
    generic = MetaDataset(ListDataset([("a", 0), ("b", 1)]))
    assert run(LoadData(generic)([DataDescription(1)])) == [("b", 1)]
    assert len(LoadData(generic)(None)) == 2  # None: the whole dataset


def test_remap_labels_numbers_the_task_labels():
    meta = MetaDataset(TensorDataset(torch.arange(4.0), torch.tensor([7, 3, 7, 3])))
    task = [DataDescription(i) for i in range(4)]
    out = run(RemapLabels(meta, shuffle=False)(LoadData(meta)(task)))
    assert [y for _, y in out] == [1, 0, 1, 0] and all(type(s) is list for s in out)
    seen = set()
    for _ in range(20):
        task = [DataDescription(i) for i in range(4)]
        out = run(RemapLabels(meta)(LoadData(meta)(task)))
        assert out[0][1] == out[2][1] != out[1][1] == out[3][1]
        seen.add(out[0][1])
    assert seen == {0, 1}  # shuffled numbering
    # Labels of any hashable kind, loaded as plain values.
    words = MetaDataset(ListDataset([("x", "cat"), ("y", "dog")]))
    out = run(RemapLabels(words, shuffle=False)(LoadData(words)([DataDescription(1)])))
    assert out == [["y", 0]]
    assert RemapLabels.remap(("a", 5, "c"), lambda y: y + 1) == ["a", 6, "c"]


def test_consecutive_labels_sorts_stably_by_label():
    meta = MetaDataset(toy())
    task = [DataDescription(i) for i in [3, 1, 7, 0, 5, 4]]
    assert [d.index for d in ConsecutiveLabels(meta)(task)] == [0, 4, 1, 5, 3, 7]
    assert [d.index for d in ConsecutiveLabels(meta)(None)] == [
        0,
        4,
        8,
        1,
        5,
        9,
        2,
        6,
        10,
        3,
        7,
        11,
    ]


def test_filter_labels():
    meta = MetaDataset(toy())
    flt = FilterLabels(meta, [1, 3])
    assert [d.index for d in flt(None)] == [1, 3, 5, 7, 9, 11] == flt.filtered_indices
    assert [d.index for d in flt([DataDescription(i) for i in range(6)])] == [1, 3, 5]
    with pytest.raises(ValueError, match=r"FilterLabels: labels \[9\] are not in the dataset"):
        FilterLabels(meta, [9])


def test_fused_nways_kshots():
    meta = MetaDataset(toy())
    task = FusedNWaysKShots(meta, n=2, k=2)(None)
    labels = labels_of(meta, task)
    assert len(set(labels)) == 2 and labels[0] == labels[1] != labels[2] == labels[3]
    only = FusedNWaysKShots(meta, n=2, k=1, filter_labels=[0, 2])
    assert sorted(labels_of(meta, only(None))) == [0, 2]
    description = [DataDescription(i) for i in [0, 1, 4, 5, 8, 9, 2]]  # labels 0 1 0 1 0 1 2
    kept = FusedNWaysKShots(meta, n=1, k=3, filter_labels=[0, 1])(description)
    assert len(kept) == 3 and len(set(labels_of(meta, kept))) == 1
    defaults = FusedNWaysKShots(meta)
    assert (defaults.n, defaults.k, defaults.replacement, defaults.filter_labels) == (
        2,
        1,
        False,
        [0, 1, 2, 3],
    )
    with pytest.raises(ValueError, match=r"FusedNWaysKShots: k=4 .*only 3"):
        FusedNWaysKShots(meta, n=1, k=4)(None)
    assert len(FusedNWaysKShots(meta, n=1, k=4, replacement=True)(None)) == 4


def test_nways_then_kshots_draws_uniformly():
    """The task dataset's NWays-then-KShots start draws as the two transforms in turn do."""
    meta = MetaDataset(toy(classes=4, per_class=3))
    tasks = TaskDataset(meta, [NWays(meta, 2), KShots(meta, 2)])
    separate = [NWays(meta, 2), KShots(meta, 2)]
    draws = 3000
    for draw in (tasks.sample_task_description, lambda: separate[1](separate[0](None))):
        classes, samples, firsts = Counter(), Counter(), Counter()
        for _ in range(draws):
            task = draw()
            labels = labels_of(meta, task)
            assert len(task) == 4 and labels[0] == labels[1] != labels[2] == labels[3]
            assert len({d.index for d in task}) == 4
            classes.update(set(labels))
            samples.update(d.index for d in task)
            firsts[labels[0]] += 1
        # Each class in a task with probability 1/2, each sample 1/3, first class 1/4.
        assert all(abs(classes[c] / draws - 1 / 2) < 0.05 for c in range(4)), classes
        assert all(abs(samples[i] / draws - 1 / 3) < 0.05 for i in range(12)), samples
        assert all(abs(firsts[c] / draws - 1 / 4) < 0.05 for c in range(4)), firsts


# -- TaskDataset ----------------------------------------------------------------------
def five_way_two_shot(meta, **kwargs):
    t = [NWays(meta, 5), KShots(meta, 2), LoadData(meta), RemapLabels(meta)]
    return TaskDataset(meta, t, **kwargs)


def test_task_dataset_samples_collated_tasks():
    meta = MetaDataset(toy(classes=10, per_class=4))
    x, y = five_way_two_shot(meta).sample()
    assert x.shape == (10, 1) and y.dtype == torch.int64
    assert sorted(y.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ((x.view(-1).long() % 10).tolist()) == [
        meta.indices_to_labels[int(v)] for v in x.view(-1)
    ]  # inputs match their classes
    for label in range(5):  # one original class per new label
        assert len({int(v) % 10 for v in x.view(-1)[y == label]}) == 1


def test_task_dataset_num_tasks_keeps_descriptions():
    meta = MetaDataset(toy(classes=10, per_class=4))
    tasks = five_way_two_shot(meta, num_tasks=3)
    assert len(tasks) == 3
    first = tasks[1]
    assert torch.equal(first[0], tasks[1][0]) and set(tasks.sampled_descriptions) == {1}
    listed = list(tasks)
    assert len(listed) == 3 and torch.equal(listed[1][0], first[0])
    assert len(list(tasks)) == 3  # iterating again starts over
    for _ in range(10):
        x, _ = tasks.sample()
        assert any(torch.equal(x, t[0]) for t in listed)


def test_task_dataset_without_num_tasks_is_endless():
    meta = MetaDataset(toy(classes=10, per_class=4))
    tasks = five_way_two_shot(meta)
    assert len(tasks) == 1
    it = iter(tasks)
    drawn = [next(it)[0] for _ in range(5)]
    assert not all(torch.equal(drawn[0], d) for d in drawn[1:])
    assert tasks.sampled_descriptions == {}


def test_task_dataset_arguments():
    data = toy(classes=10, per_class=4)
    with pytest.raises(ValueError, match=r"num_tasks needs to be -1 \(infinity\) or positive"):
        TaskDataset(data, num_tasks=0)
    with pytest.raises(ValueError, match="num_tasks needs to be -1"):
        TaskDataset(data, num_tasks=-2)
    with pytest.raises(ValueError, match="num_tasks must be an int"):
        TaskDataset(data, num_tasks=2.0)
    with pytest.raises(ValueError, match="no task_transforms"):
        TaskDataset(data).sample()
    tasks = TaskDataset(data)  # a plain dataset is wrapped
    assert isinstance(tasks.dataset, MetaDataset) and tasks.task_transforms == []
    meta = MetaDataset(data)
    single = TaskDataset(meta, NWays(meta, 3))
    assert len({meta.indices_to_labels[d.index] for d in single.sample_task_description()}) == 3
    raw = TaskDataset(
        meta,
        [NWays(meta, 2), KShots(meta, 1), LoadData(meta), RemapLabels(meta)],
        task_collate=lambda samples: samples,
    ).sample()
    assert len(raw) == 2 and all(type(s) is list and type(s[1]) is int for s in raw)
    with pytest.raises(NotImplementedError, match="adding TaskDatasets"):
        tasks + tasks
    assert Taskset is TaskDataset


def test_task_dataset_pickles():
    """As a DataLoader with workers needs under the spawn start method."""
    meta = MetaDataset(toy(classes=10, per_class=4))
    tasks = five_way_two_shot(meta, num_tasks=2)
    x, y = tasks[0]
    again = pickle.loads(pickle.dumps(tasks))
    x2, y2 = again[0]
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_task_dataset_in_a_dataloader():
    meta = MetaDataset(toy(classes=10, per_class=4))
    tasks = five_way_two_shot(meta, num_tasks=4)
    batches = list(DataLoader(tasks, batch_size=2))
    assert len(batches) == 2 and batches[0][0].shape == (2, 10, 1)


@pytest.mark.parametrize(
    "samples",
    [
        [(torch.randn(2, 3), 1), (torch.randn(2, 3), 0)],
        [[torch.randn(3), 4], [torch.randn(3), 2]],
        [(torch.randn(3), torch.tensor(1)), (torch.randn(3), torch.tensor(0))],
        [(torch.randn(3), 1.5), (torch.randn(3), 0.5)],  # default_collate's path
        [(torch.randn(3), 1, "a"), (torch.randn(3), 0, "b")],
        [{"x": torch.randn(2)}, {"x": torch.randn(2)}],
    ],
    ids=["tuple-int", "list-int", "tensor-labels", "float-labels", "triples", "dicts"],
)
def test_collate_is_default_collate(samples):
    ours, ref = _collate(samples), default_collate(samples)
    assert type(ours) is type(ref)
    flat = ours.values() if isinstance(ours, dict) else ours
    flat_ref = ref.values() if isinstance(ref, dict) else ref
    for a, b in zip(flat, flat_ref, strict=True):
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b)
        else:
            assert a == b


# -- utils -----------------------------------------------------------------------------
def test_partition_task():
    data, labels = torch.arange(12.0), torch.tensor([2, 0, 1] * 4)
    (xs, ys), (xq, yq) = partition_task(data, labels, shots=1)
    assert ys.tolist() == [0, 1, 2] and xs.tolist() == [1.0, 2.0, 0.0]
    assert yq.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert xq.tolist() == [4.0, 7.0, 10.0, 5.0, 8.0, 11.0, 3.0, 6.0, 9.0]
    (xs, ys), _ = partition_task(torch.randn(12, 2, 2), labels, shots=3)
    assert xs.shape == (9, 2, 2)


def test_partition_task_bad_input():
    labels = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="`data` has 3 samples but `labels` has 4"):
        partition_task(torch.zeros(3), labels)
    with pytest.raises(ValueError, match="same number of samples"):
        partition_task(torch.zeros(3), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="`shots`=3 but each class holds only 2"):
        partition_task(torch.zeros(4), labels, shots=3)
    with pytest.raises(ValueError, match="`shots` must be 0 or more"):
        partition_task(torch.zeros(4), labels, shots=-1)


def test_partition_task_zero_shots_gives_an_empty_support_set():
    # learn2learn accepts shots=0, and its own unit test calls it.
    data, labels = torch.arange(4.0), torch.tensor([0, 1, 0, 1])
    (xs, ys), (xq, yq) = partition_task(data, labels, shots=0)
    assert xs.shape == (0,) and ys.shape == (0,)
    assert xq.tolist() == [0.0, 2.0, 1.0, 3.0] and yq.tolist() == [0, 0, 1, 1]


def test_infinite_iterator():
    loader = DataLoader(TensorDataset(torch.arange(3.0)), batch_size=2)
    batches = InfiniteIterator(loader)
    sizes = [len(next(batches)[0]) for _ in range(5)]
    assert sizes == [2, 1, 2, 1, 2] and iter(batches) is batches
    with pytest.raises(ValueError, match="yields nothing"):
        next(InfiniteIterator([]))


def test_on_device_dataset():
    data = ListDataset([(torch.full((2,), float(i)), i % 2) for i in range(4)])
    held = OnDeviceDataset(data, device="cpu", transform=lambda x: -x)
    assert held.tensors[0].shape == (4, 2) and held.tensors[1].tolist() == [0, 1, 0, 1]
    x, y = held[3]
    assert x.tolist() == [-3.0, -3.0] and y.item() == 1
    meta = MetaDataset(held)  # labels read from the tensor
    assert meta.labels_to_indices == {0: [0, 2], 1: [1, 3]}
    fast = OnDeviceDataset(toy())
    assert torch.equal(fast.tensors[0], toy().tensors[0])

    class Cached(TensorDataset):
        _bookkeeping_path = "/nonexistent/bk.pkl"

    assert OnDeviceDataset(Cached(*toy().tensors))._bookkeeping_path == "/nonexistent/bk.pkl"


def test_public_names():
    assert l2l.data.transforms.NWays is NWays
    for name in l2l.data.__all__:
        assert getattr(l2l.data, name) is not None
    for name in l2l.data.transforms.__all__:
        assert isinstance(getattr(l2l.data.transforms, name), type)


def test_task_sampling_benchmark_runs(capsys):
    from benchmarks import learn2learn_tasks

    result = learn2learn_tasks.main(["--rounds", "1", "--tasks", "20", "--classes", "10"])
    assert result["higher.learn2learn"]["tasks_per_s"] > 0
    assert "| higher.learn2learn |" in capsys.readouterr().out


def test_draws_follow_learn2learns_random_calls():
    # learn2learn draws classes from list(set(labels)) (CPython's order for ints) and
    # builds its transforms without drawing; the same random state gives the same task.
    labels = torch.tensor([9, 2, 17, 9, 2, 17, 33, 33])
    meta = MetaDataset(TensorDataset(torch.arange(8.0), labels))
    state = random.getstate()
    fused = FusedNWaysKShots(meta, n=2, k=1)
    assert random.getstate() == state
    task = [DataDescription(i) for i in range(8)]
    random.seed(3)
    expected = set(random.sample(list({9, 2, 17, 33}), 2))
    random.seed(3)
    kept = NWays(meta, 2)(task)
    assert {int(labels[dd.index]) for dd in kept} == expected
    random.seed(5)
    chosen = random.sample(meta.labels, 2)
    shots = [random.sample(meta.labels_to_indices[c], 1)[0] for c in chosen]
    random.seed(5)
    assert [dd.index for dd in fused(None)] == shots
    random.seed(7)
    order = list({9, 2, 17, 33})
    random.shuffle(order)
    random.seed(7)
    remapped = RemapLabels(meta)(LoadData(meta)([DataDescription(i) for i in range(8)]))
    got = [dd.transforms[1](dd.transforms[0](dd.index))[1] for dd in remapped]
    assert got == [order.index(int(y)) for y in labels]
