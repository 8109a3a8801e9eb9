"""Checkpointed unrolls give the un-checkpointed meta-gradients, bit for bit."""

from __future__ import annotations

import functools
import gc
import weakref

import pytest
import torch
from optim_cases import CASE_IDS, CASES
from test_patch_modules import KINDS, call, first, seeded_build
from torch import nn

import higher

T = 4
F64 = torch.float64


def batches(n=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 2, generator=g, dtype=F64), torch.randn(6, 1, generator=g, dtype=F64))
        for _ in range(n)
    ]


def make_model(dropout=False, batchnorm=False):
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(2, 4)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(4))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(0.3))
    layers.append(nn.Linear(4, 1))
    return nn.Sequential(*layers).double()


def tensor_override(case, opt):
    """The case's learnable hyperparameters as tensors that require grad."""
    tensors, override = [], {}
    for key in case.learnable:
        value = opt.param_groups[0][key]
        if isinstance(value, tuple):
            pair = tuple(torch.tensor(float(v), dtype=F64, requires_grad=True) for v in value)
            tensors += pair
            override[key] = pair
        else:
            override[key] = torch.tensor(float(value), dtype=F64, requires_grad=True)
            tensors.append(override[key])
    return tensors, override


def unroll(model, opt, checkpoint, override=None, first_order=False, steps=T, between=None):
    """Meta-gradients w.r.t. initial weights, hyperparameters and data weights."""
    hyper = [] if override is None else override[0]
    weights = torch.linspace(0.5, 1.5, 6, dtype=F64).unsqueeze(1).requires_grad_()
    data = batches(steps)
    torch.manual_seed(7)
    with higher.innerloop_ctx(
        model,
        opt,
        copy_initial_weights=False,
        override=None if override is None else override[1],
        first_order=first_order,
        checkpoint=checkpoint,
    ) as (fmodel, diffopt):
        for t, (x, y) in enumerate(data):
            diffopt.step(lambda x=x, y=y: (weights * (fmodel(x) - y) ** 2).mean())
            if between is not None:
                between(t, fmodel, diffopt)
        x, y = data[0]
        outer = ((fmodel(x) - y) ** 2).mean()
        inputs = [*model.parameters(), *hyper, weights]
        grads = torch.autograd.grad(outer, inputs, allow_unused=True)
        buffers = [b.clone() for b in fmodel.buffers()]
    after = torch.rand(3)  # the replay must leave the global generator alone
    return [outer.detach(), *grads, *buffers, after]


def assert_same(got, want, tol=1e-12):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, atol=tol, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_optimizer_with_tensor_hyperparameters(case):
    def run(checkpoint):
        model = make_model()
        opt = case.opt_type(model.parameters(), **case.kwargs)
        return unroll(model, opt, checkpoint, override=tensor_override(case, opt))

    want = run(False)
    assert all(g is not None for g in want[1:5])  # the initial weights' meta-gradients
    assert_same(run(True), want)
    assert_same(run(3), want)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("sgd-momentum", "adam")], ids=str)
def test_first_order(case):
    def run(checkpoint):
        model = make_model()
        opt = case.opt_type(model.parameters(), **case.kwargs)
        return unroll(model, opt, checkpoint, first_order=True)

    assert_same(run(2), run(False))


@pytest.mark.parametrize("checkpoint", [True, 2])
def test_dropout_replays_its_masks(checkpoint):
    def draw(t, fmodel, diffopt):
        if t == 1:
            torch.rand(5)  # random numbers drawn between steps move the generator on

    def run(ck, between=None):
        model = make_model(dropout=True)
        return unroll(model, torch.optim.SGD(model.parameters(), lr=0.3), ck, between=between)

    assert_same(run(checkpoint), run(False))
    assert_same(run(checkpoint, draw), run(False, draw))


@pytest.mark.parametrize("checkpoint", [True, 3])
def test_batchnorm_statistics_are_updated_once(checkpoint):
    def switch(t, fmodel, diffopt):
        # Mixed modes: the replay must use each step's own mode and statistics.
        fmodel.train(t % 2 == 1)
        # Eval-mode batch norm saves its running statistics for the backward, and
        # train mode updates them in place without torch noticing: new tensors
        # keep the un-checkpointed reference correct.
        bn = fmodel[1]
        bn.running_mean, bn.running_var = bn.running_mean.clone(), bn.running_var.clone()

    def run(ck, between=None):
        model = make_model(batchnorm=True)
        return unroll(model, torch.optim.Adam(model.parameters(), lr=0.05), ck, between=between)

    assert_same(run(checkpoint), run(False))
    assert_same(run(checkpoint, switch), run(False, switch))


def test_scheduler_and_overrides_given_at_a_step():
    lr = torch.tensor(0.2, dtype=F64, requires_grad=True)

    def run(ck):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        weights = torch.ones(6, 1, dtype=F64)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, checkpoint=ck) as (
            fmodel,
            diffopt,
        ):
            diffopt.attach_scheduler(sched)
            for t, (x, y) in enumerate(batches()):
                override = {"lr": lr} if t == 2 else None
                diffopt.step(
                    lambda x=x, y=y: (weights * (fmodel(x) - y) ** 2).mean(), override=override
                )
            x, y = batches()[0]
            outer = ((fmodel(x) - y) ** 2).mean()
            return torch.autograd.grad(outer, [*model.parameters(), lr])

    assert_same(run(2), run(False))


def test_closure_step_without_checkpointing_is_a_plain_step():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    got = diffopt.step(lambda: ((fmodel(x) - y) ** 2).mean())
    fmodel.update_params(list(model.parameters()))
    want = diffopt.step(((fmodel(x) - y) ** 2).mean())
    assert_same(got, want, tol=0)


def test_intermediate_weights_are_not_kept():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, checkpoint=3) as (fm, dopt):
        refs, pointers = [], []
        for _ in range(6):
            new = dopt.step(lambda: ((fm(x) - y) ** 2).mean())
            refs.append([weakref.ref(p) for p in new])
            pointers.append([p.data_ptr() for p in new])
        gc.collect()
        alive = [all(r() is not None for r in step) for step in refs]
        assert alive == [False] * 5 + [True]  # only the current weights
        # The last segment starts from the weights after step 3: their values are
        # kept (without their graph) for the replay; none inside a segment are.
        start = dopt.closure_runner.segment.params
        assert [p.data_ptr() for p in start] == pointers[2]
        ((fm(x) - y) ** 2).mean().backward()
    assert model[0].weight.grad is not None


def meta_batch(model, checkpoint, tasks):
    """MAML over ``tasks``, query losses summed into one backward, closures written the
    naive way: they read the loop's variables ``fm``, ``x`` and ``y`` when called."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    total = 0.0
    for support, (xq, yq) in tasks:
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=False, checkpoint=checkpoint
        ) as (
            fm,
            dopt,
        ):
            for x, y in support:
                dopt.step(lambda: ((fm(x) - y) ** 2).mean())  # noqa: B023 - what is tested
            total = total + ((fm(xq) - yq) ** 2).mean()
    return torch.autograd.grad(total, list(model.parameters()))


def test_a_closure_reading_loop_variables_replays_what_they_held():
    """Late-bound closures (the patched model of the meta-batch's last task, the loop's last
    batch) replay with the values of their step: the meta-gradient is the plain unroll's."""
    data = batches(2 * T + 2)
    tasks = [(data[:T], data[T]), (data[T + 1 : 2 * T + 1], data[2 * T + 1])]
    want = meta_batch(make_model(), False, tasks)
    for checkpoint in (True, 2):
        assert_same(meta_batch(make_model(), checkpoint, tasks), want, tol=0)


MODULE_LEVEL = """
total = 0.0
for support, (xq, yq) in tasks:
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, checkpoint=True) as (fm, dopt):
        for x, y in support:
            dopt.step(lambda: ((fm(x) - y) ** 2).mean())
        total = total + ((fm(xq) - yq) ** 2).mean()
grads = torch.autograd.grad(total, list(model.parameters()))
"""


def test_a_closure_reading_globals_replays_what_they_held():
    """The same at a script's top level, where the loop's variables are globals."""
    data = batches(2 * T + 2)
    tasks = [(data[:T], data[T]), (data[T + 1 : 2 * T + 1], data[2 * T + 1])]
    model = make_model()
    namespace = {"torch": torch, "higher": higher, "tasks": tasks, "model": model}
    namespace["opt"] = torch.optim.SGD(model.parameters(), lr=0.1)
    exec(MODULE_LEVEL, namespace)
    assert_same(namespace["grads"], meta_batch(make_model(), False, tasks), tol=0)
    assert namespace["fm"] is not None and namespace["x"] is data[2 * T][0]  # put back


def test_a_closure_whose_data_changes_is_caught():
    """Data reached through a container that changes between the step and the backward
    cannot be put back: the replayed loss differs, and the error names the step."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = {}
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, checkpoint=True) as (
        fm,
        dopt,
    ):
        for x, y in batches():
            batch.update(x=x, y=y)
            dopt.step(lambda: ((fm(batch["x"]) - batch["y"]) ** 2).mean())
        outer = ((fm(x) - y) ** 2).mean()
        # The backward replays the last step first, which is right, then the one before.
        with pytest.raises(
            RuntimeError, match=f"step {T - 1} of the inner loop: its closure returned a "
        ):
            outer.backward()


@pytest.mark.parametrize("steps_per_segment", [1, 3])
def test_a_closure_whose_computation_changes_is_named(steps_per_segment):
    """A closure that draws new data of another size saves other tensors when replayed:
    the error names the step and the first saved tensor that differs."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sizes = iter([5, 5, 6, 5, 7, 7])  # the first run's step 2 sees 5 rows, its replay 7
    gen = torch.Generator().manual_seed(0)

    def closure():
        x = torch.randn(next(sizes), 2, generator=gen, dtype=torch.float64)
        return (fm(x) ** 2).mean()

    with higher.innerloop_ctx(
        model, opt, copy_initial_weights=False, checkpoint=steps_per_segment
    ) as (fm, dopt):
        dopt.step(closure)
        dopt.step(closure)
        with pytest.raises(
            RuntimeError,
            match=r"checkpointed step [12] of the inner loop did not "
            r"repeat .* saved tensor \d+ is a float64 tensor of shape \(\d+, ",
        ):
            (fm(torch.ones(1, 2, dtype=torch.float64)) ** 2).sum().backward()


def test_the_hook_probe_saves_nothing_into_the_callers_hooks():
    """The probe of torch.utils.checkpoint runs under hooks of its own: a patched module made
    inside a checkpointed step (or any saved-tensor hooks) would otherwise count its tensors."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        assert higher._compat.checkpoint_hooked()
    assert saved == []


def test_errors():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in ("yes", 0, -2, 1.5):
        with (
            pytest.raises(ValueError, match="checkpoint must be a bool or a positive"),
            higher.innerloop_ctx(model, opt, checkpoint=bad),
        ):
            pass
    diffopt = higher.optim.get_diff_optim(opt, model.parameters())
    with pytest.raises(ValueError, match="has none: pass fmodel="):
        higher.checkpoint.enable(diffopt)
    x, _ = batches(1)[0]
    with higher.innerloop_ctx(model, opt, checkpoint=True) as (fmodel, diffopt):
        with pytest.raises(ValueError, match="without params"):
            diffopt.step(lambda: fmodel(x).sum(), params=list(fmodel.parameters()))
        with pytest.raises(TypeError, match="must return the loss tensor, got float"):
            diffopt.step(lambda: 1.0)


def test_an_unroll_without_backward_is_freed_once_detached():
    # The closure holds the patched module, whose weights hold the graph, whose
    # saved-tensor hooks hold the closure: detach_ cuts that cycle.
    def unroll_and_detach():
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        x, y = batches(1)[0]
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, checkpoint=2) as (
            fm,
            dopt,
        ):
            for _ in range(3):
                dopt.step(lambda: ((fm(x) - y) ** 2).mean())
            fm.detach_()
            dopt.detach_()
            return weakref.ref(dopt.closure_runner.segment)

    segment = unroll_and_detach()
    gc.collect()
    assert segment() is None


def test_nothing_to_checkpoint_without_a_graph():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    want = [
        p - 0.1 * g
        for p, g in zip(
            model.parameters(),
            torch.autograd.grad(((model(x) - y) ** 2).mean(), list(model.parameters())),
        )
    ]
    with higher.innerloop_ctx(model, opt, track_higher_grads=False, checkpoint=True) as (fm, dopt):
        got = dopt.step(lambda: ((fm(x) - y) ** 2).mean())
        assert dopt.closure_runner.segment is None  # ran as a plain step
    assert_same(got, [w.detach() for w in want], tol=1e-15)


def test_a_step_whose_closure_fails_leaves_the_segment_intact():
    def run(ck, fail):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        data = batches()
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, checkpoint=ck) as (
            fm,
            dopt,
        ):
            for t, (x, y) in enumerate(data):
                if fail and t == 2:

                    def broken(x=x):
                        fm(x)  # saves tensors, then fails before returning a loss
                        raise KeyError("boom")

                    with pytest.raises(KeyError, match="boom"):
                        dopt.step(broken)
                dopt.step(lambda x=x, y=y: ((fm(x) - y) ** 2).mean())
            x, y = data[0]
            return torch.autograd.grad(((fm(x) - y) ** 2).mean(), list(model.parameters()))

    assert_same(run(3, fail=True), run(False, fail=False))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_batched_tasks_with_dropout_and_batchnorm(strategy):
    """Checkpointing composes with batched mode: same meta-gradients and statistics."""
    data = batches(n=9)  # steps x tasks
    xs = torch.stack([x for x, _ in data]).view(3, 3, 6, 2)
    ys = torch.stack([y for _, y in data]).view(3, 3, 6, 1)

    def run(ck):
        model = make_model(dropout=True, batchnorm=True)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        torch.manual_seed(1)
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=False, num_tasks=3, checkpoint=ck
        ) as (fm, dopt):
            fm.task_strategy = strategy
            for t in range(3):
                dopt.step(lambda t=t: ((fm(xs[t]) - ys[t]) ** 2).mean(dim=(1, 2)))
            loss = ((fm(xs[0]) - ys[0]) ** 2).mean(dim=(1, 2)).sum()
            grads = torch.autograd.grad(loss, list(model.parameters()))
            return [*grads, fm[1].running_mean.clone(), fm[1].running_var.clone()]

    assert_same(run(2), run(False))


class _AttentionNet(nn.Module):
    """A small net whose forward calls scaled_dot_product_attention itself."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward-outside", "inside"])
def test_steps_under_autocast_replay_in_their_precision(backward_inside):
    # The usual mixed-precision pattern: steps inside torch.autocast, the outer
    # backward outside it. The replay must compute in bfloat16 again, as the
    # first run did, whatever autocast state the backward runs in.
    def meta_grads(checkpoint):
        torch.manual_seed(0)
        model = _AttentionNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        xs = [torch.randn(2, 5, 4, generator=g) for _ in range(4)]
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=False, checkpoint=checkpoint
        ) as (fmodel, diffopt):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                for x in xs[:3]:
                    diffopt.step(lambda x=x: fmodel(x).float().pow(2).mean())
                query = fmodel(xs[3]).float().pow(2).mean()
                if backward_inside:
                    return torch.autograd.grad(query, list(model.parameters()))
            return torch.autograd.grad(query, list(model.parameters()))

    plain, checkpointed = meta_grads(False), meta_grads(2)
    assert all(g.dtype == torch.float32 for g in plain)
    for a, b in zip(checkpointed, plain):
        assert torch.equal(a, b)


def test_replay_restores_the_attention_backends_of_the_first_run():
    # A step taken with the math kernel forced by the user replays on it too,
    # even though the backward runs where every backend is enabled again.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def meta_grads(checkpoint):
        torch.manual_seed(0)
        model = _AttentionNet().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(2, 5, 4, dtype=F64)
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=False, checkpoint=checkpoint, first_order=True
        ) as (fmodel, diffopt):
            with sdpa_kernel([SDPBackend.MATH]):
                diffopt.step(lambda: fmodel(x).pow(2).mean())
            flags = higher._compat.sdp_flags()
            query = fmodel(x).pow(2).mean()
            grads = torch.autograd.grad(query, list(model.parameters()))
            assert higher._compat.sdp_flags() == flags  # restored after the replay
            return grads

    for a, b in zip(meta_grads(True), meta_grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


PRECISIONS = ("float32", "float64", "bfloat16-autocast")


def _onednn_lacks_bf16_lstm() -> bool:
    """Whether plain torch fails an LSTM on computed weights (as fast weights are) under
    CPU bfloat16 autocast: oneDNN has no such primitive on CPUs without AVX-512, and
    says "could not create a primitive descriptor"; the case then cannot run at all."""
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    weights = {k: p * 1.0 for k, p in lstm.named_parameters()}
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.func.functional_call(lstm, weights, (torch.randn(2, 5, 3),))
    except RuntimeError as error:
        if "primitive descriptor" in str(error):
            return True
        raise
    return False


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_module_kind_replays_exactly(kind, precision):
    """A checkpointed unroll gives the meta-gradient of the same unroll kept whole, bit for
    bit, for every module kind, in float32 at default settings (as users run it), float64
    and CPU bfloat16 autocast: the replay runs the same kernels on the same values."""
    build, make_input = KINDS[kind]
    dtype = torch.float64 if precision == "float64" else torch.float32
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.endswith("autocast"))
    if kind == "lstm" and precision.endswith("autocast") and _onednn_lacks_bf16_lstm():
        pytest.skip("plain torch cannot run an LSTM on fast weights under bf16 autocast here")

    def run(checkpoint):
        torch.manual_seed(0)
        module = seeded_build(build).to(dtype)
        torch.manual_seed(1)
        xs = [make_input() for _ in range(3)]
        xs = [x.to(dtype) if x.is_floating_point() else x for x in xs]
        opt = torch.optim.SGD(module.parameters(), lr=0.05)
        with higher.innerloop_ctx(
            module, opt, copy_initial_weights=False, checkpoint=checkpoint
        ) as (fm, dopt):
            for x in xs[:2]:
                with autocast:
                    dopt.step(
                        functools.partial(lambda x: first(call(fm, x)).float().pow(2).mean(), x)
                    )
            with autocast:
                query = first(call(fm, xs[2])).float().pow(2).mean()
            query.backward()
        return [p.grad for p in module.parameters()]

    plain, replayed = run(False), run(True)
    for i, (a, b) in enumerate(zip(plain, replayed)):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{kind}: parameter {i}")
