"""Batched tasks (``num_tasks=N``) against the per-task loop, in float64."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from optim_cases import CASE_IDS, CASES
from torch import nn

import higher
from higher.batched import per_task
from higher.optim import PerParameter

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

N = 3
STEPS = 3
TOL = {"rtol": 1e-9, "atol": 1e-12}


def close(a, b, what=""):
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def mlp():
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def mlp_data():
    return randn(N, 5, 2, seed=1), randn(N, 5, 1, seed=2), randn(N, 5, 2, seed=3), randn(N, 5, 1)


def mse(out, y):
    return ((out - y) ** 2).mean()


task_mse = torch.func.vmap(mse)


def run(model, opt, data, batched, steps=STEPS, loss=mse, strategy=None, step_kwargs=None, **ctx):
    """Inner loops on every task and the meta-backward of the mean query loss.

    Returns the adapted weights, optimizer states and buffers per task (as
    lists indexed by task) and the gradients of the model and of ``hyper``.
    """
    xs, ys, xq, yq = data
    hyper = ctx.pop("hyper", [])
    ctx.setdefault("copy_initial_weights", False)
    model.zero_grad(set_to_none=True)
    for h in hyper:
        h.grad = None
    step_kwargs = step_kwargs or {}
    adapted, states, buffers, init_grads = [], [], [], []
    if batched:
        with higher.innerloop_ctx(model, opt, num_tasks=N, **ctx) as (fmodel, diffopt):
            if strategy is not None:
                fmodel.task_strategy = strategy
            for _ in range(steps):
                diffopt.step(torch.func.vmap(loss)(fmodel(xs), ys), **step_kwargs)
            (torch.func.vmap(loss)(fmodel(xq), yq).sum() / N).backward()
        if ctx["copy_initial_weights"]:  # each task's own initial leaves
            hyper_grads = [p.grad for p in fmodel.parameters(time=0)]
            init_grads = [[g[i] for g in hyper_grads] for i in range(N)]
        for i in range(N):
            adapted.append([p[i] for p in fmodel.fast_params])
            states.append([_task_state(st, i, n=N) for st in diffopt.state])
            # Floating-point buffers are kept per task, integer ones shared.
            buffers.append([b[i] if b.is_floating_point() else b for b in fmodel.buffers()])
    else:
        for i in range(N):
            with higher.innerloop_ctx(model, opt, **ctx) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss(fmodel(xs[i]), ys[i]), **step_kwargs)
                (loss(fmodel(xq[i]), yq[i]) / N).backward()
            adapted.append(list(fmodel.fast_params))
            if ctx["copy_initial_weights"]:
                init_grads.append([p.grad for p in fmodel.parameters(time=0)])
            states.append(list(diffopt.state))
            buffers.append(list(fmodel.buffers()))
    grads = [p.grad for p in model.parameters()] + [h.grad for h in hyper]
    return {
        "adapted": adapted,
        "states": states,
        "buffers": buffers,
        "grads": grads,
        "init_grads": init_grads,
    }


def _task_state(state, i, n):
    out = {}
    for k, v in state.items():
        stacked = isinstance(v, torch.Tensor) and v.dim() > 0 and v.size(0) == n
        out[k] = v[i] if stacked else v
    return out


def assert_same(batched, loop, meta_gradient=True):
    for i, (ga, gb) in enumerate(zip(batched["init_grads"], loop["init_grads"])):
        for j, (a, b) in enumerate(zip(ga, gb)):
            close(a, b, f"task {i} gradient of initial weight {j}")
    for i in range(N):
        for j, (a, b) in enumerate(zip(batched["adapted"][i], loop["adapted"][i])):
            close(a, b, f"task {i} adapted weight {j}")
        for j, (a, b) in enumerate(zip(batched["buffers"][i], loop["buffers"][i])):
            close(a, b, f"task {i} buffer {j}")
        for j, (sa, sb) in enumerate(zip(batched["states"][i], loop["states"][i])):
            assert sa.keys() == sb.keys()
            for k in sa:
                if isinstance(sb[k], torch.Tensor):
                    close(sa[k].detach(), sb[k].detach(), f"task {i} state {j} {k}")
                else:
                    assert sa[k] == pytest.approx(sb[k], rel=1e-12), f"task {i} state {j} {k}"
    for j, (a, b) in enumerate(zip(batched["grads"], loop["grads"])):
        assert (a is None) == (b is None), f"gradient {j}"
        if b is not None:
            close(a, b, f"meta-gradient {j}")
    if meta_gradient:
        assert any(g is not None and g.abs().sum() > 0 for g in loop["grads"]), "no meta-gradient"


def both(make_model, make_opt, data, meta_gradient=True, **kwargs):
    model = make_model()
    opt = make_opt(model)
    loop = run(model, opt, data, batched=False, **kwargs)
    batched = run(model, opt, data, batched=True, **kwargs)
    assert_same(batched, loop, meta_gradient)
    return batched, loop


# -- optimizers ------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_optimizer_matches_the_per_task_loop(case):
    both(mlp, lambda m: case.opt_type(m.parameters(), **case.kwargs), mlp_data())


def test_warm_optimizer_state_is_each_tasks_starting_state():
    def make_opt(m):
        opt = torch.optim.Adam(m.parameters(), lr=0.01)
        m(randn(4, 2)).sum().backward()
        opt.step()
        return opt

    both(mlp, make_opt, mlp_data())


def two_groups(m):
    return torch.optim.SGD(
        [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.05}],
        lr=0.1,
        momentum=0.5,
    )


@pytest.mark.parametrize(
    "override",
    [
        pytest.param(lambda m: {"lr": torch.tensor(0.2, dtype=torch.float64)}, id="one-value"),
        pytest.param(lambda m: {"lr": [0.2, 0.03], "momentum": [0.1]}, id="per-group"),
        pytest.param(
            lambda m: {
                "lr": [
                    PerParameter([torch.full((4, 2), 0.1), torch.full((4,), 0.2)]),
                    PerParameter([torch.tensor(0.3), torch.full((1,), 0.05)]),
                ]
            },
            id="per-parameter",
        ),
    ],
)
def test_overrides_match_the_per_task_loop(override):
    model = mlp()
    opt = two_groups(model)
    values = override(model)
    loop = run(model, opt, mlp_data(), batched=False, override=copy.deepcopy(values))
    batched = run(model, opt, mlp_data(), batched=True, override=copy.deepcopy(values))
    assert_same(batched, loop)


@pytest.mark.parametrize("opt_type", [torch.optim.SGD, torch.optim.Adam])
def test_learned_hyperparameters_get_the_loops_meta_gradient(opt_type):
    # Meta-SGD style: per-parameter learning rates of each parameter's shape,
    # and a learned per-group weight decay.
    model = mlp()
    opt = opt_type(model.parameters(), lr=0.1)
    lrs = [
        torch.full(p.shape, 0.05, dtype=torch.float64, requires_grad=True)
        for p in model.parameters()
    ]
    decay = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    override = {"lr": [PerParameter(lrs)], "weight_decay": decay}
    hyper = [*lrs, decay]
    loop = run(model, opt, mlp_data(), batched=False, override=override, hyper=hyper)
    batched = run(model, opt, mlp_data(), batched=True, override=override, hyper=hyper)
    assert all(g is not None for g in loop["grads"])
    assert_same(batched, loop)


def test_override_given_at_step_time():
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    both(
        mlp,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        mlp_data(),
        step_kwargs={"override": {"lr": lr}},
        hyper=[lr],
    )


@pytest.mark.parametrize(
    "flags",
    [{"first_order": True}, {"track_higher_grads": False}, {"copy_initial_weights": True}],
    ids=["first_order", "no-track", "copy-initial"],
)
def test_modes_match_the_per_task_loop(flags):
    copy_initial = flags.pop("copy_initial_weights", False)
    batched, _ = both(
        mlp,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        mlp_data(),
        meta_gradient=not (copy_initial or flags.get("track_higher_grads") is False),
        copy_initial_weights=copy_initial,
        **flags,
    )
    if copy_initial:
        assert batched["init_grads"] and all(g is not None for g in batched["init_grads"][0])


def test_elementwise_grad_callback_needs_no_wrapper():
    clamp = lambda grads: [g.clamp(-0.05, 0.05) for g in grads]  # noqa: E731
    both(
        mlp,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        mlp_data(),
        step_kwargs={"grad_callback": clamp},
    )


def test_per_task_grad_callback_clips_each_task_by_its_own_norm():
    def clip(grads):
        norm = torch.stack([g.norm() for g in grads if g is not None]).norm()
        return [None if g is None else g * (0.1 / norm) for g in grads]

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = run(model, opt, mlp_data(), batched=False, step_kwargs={"grad_callback": clip})
    wrapped = {"grad_callback": per_task(clip)}
    batched = run(model, opt, mlp_data(), batched=True, step_kwargs=wrapped)
    assert_same(batched, loop)


def test_truncated_backprop_with_detach():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xs, ys, xq, yq = mlp_data()
    lrs = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    results = []
    for batched in (False, True):
        lrs.grad = None
        per = []
        for i in [None] if batched else range(N):
            ctx = {"num_tasks": N} if batched else {}
            sel = (lambda t: t) if batched else (lambda t, i=i: t[i])
            loss = task_mse if batched else mse
            with higher.innerloop_ctx(model, opt, override={"lr": lrs}, **ctx) as (f, d):
                d.step(loss(f(sel(xs)), sel(ys)))
                f.detach_()
                d.detach_()
                d.step(loss(f(sel(xs)), sel(ys)))
                loss(f(sel(xq)), sel(yq)).sum().backward()
            per.append(f.fast_params)
        results.append((per, lrs.grad.clone()))
    (loop, g_loop), (batched, g_batched) = results
    for i in range(N):
        for a, b in zip(batched[0], loop[i]):
            close(a[i], b)
    close(g_batched, g_loop)


# -- module kinds ------------------------------------------------------------------------
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x))).mean(1)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        out, _ = self.att(x, x, x)
        return self.head(out.mean(1))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def conv_with(norm):
    return lambda: nn.Sequential(
        nn.Conv2d(2, 3, 3), norm(), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 1)
    ).double()


def image_data():
    return (randn(N, 4, 2, 6, 6, seed=1), randn(N, 4, 1, seed=2)) * 2


def token_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 7, (N, 5, 3), generator=g)
    return x, randn(N, 5, 7), x.flip(1), randn(N, 5, 7, seed=4)


MODULES = {
    "conv": (conv_with(nn.Identity), image_data),
    "batchnorm": (conv_with(lambda: nn.BatchNorm2d(3)), image_data),
    "batchnorm-cumulative": (conv_with(lambda: nn.BatchNorm2d(3, momentum=None)), image_data),
    "batchnorm-no-stats": (
        conv_with(lambda: nn.BatchNorm2d(3, track_running_stats=False)),
        image_data,
    ),
    "instancenorm": (
        conv_with(lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True)),
        image_data,
    ),
    "layernorm": (conv_with(lambda: nn.LayerNorm([3, 4, 4])), image_data),
    "groupnorm": (conv_with(lambda: nn.GroupNorm(1, 3)), image_data),
    "embedding-tied": (lambda: Tied().double(), token_data),
    "attention": (
        lambda: Attention().double(),
        lambda: (randn(N, 5, 3, 4, seed=1), randn(N, 5, 1, seed=2)) * 2,
    ),
}


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("kind", list(MODULES))
def test_module_kinds_match_the_per_task_loop(kind, strategy):
    make_model, make_data = MODULES[kind]
    both(
        make_model,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5),
        make_data(),
        steps=2,
        strategy=strategy,
    )


def test_batchnorm_keeps_running_statistics_per_task_and_leaves_the_model_alone():
    model = conv_with(lambda: nn.BatchNorm2d(3))()
    before = {k: b.clone() for k, b in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = image_data()[0]
    with higher.innerloop_ctx(model, opt, num_tasks=N) as (fmodel, diffopt):
        fmodel.task_strategy = "vmap"
        diffopt.step(fmodel(xs).pow(2).mean((1, 2)))
        mean = fmodel[1].running_mean
        assert mean.shape == (N, 3)
        assert not torch.allclose(mean[0], mean[1])
        assert fmodel[1].num_batches_tracked.item() == 1
    for k, b in model.state_dict().items():
        assert torch.equal(b, before[k]), k


def test_batchnorm_in_eval_mode():
    both(
        lambda: conv_with(lambda: nn.BatchNorm2d(3))().eval(),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        image_data(),
        strategy="vmap",
    )


def test_modules_vmap_cannot_batch_loop_over_tasks_with_a_warning():
    data = (randn(N, 2, 5, 3, seed=1), randn(N, 2, 1, seed=2)) * 2
    model = Recurrent().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = run(model, opt, data, batched=False)
    with pytest.warns(UserWarning, match=r"cannot batch lstm \(LSTM\).*one after another"):
        batched = run(model, opt, data, batched=True)
    assert_same(batched, loop)


def test_auto_strategy():
    assert higher.monkeypatch(mlp(), num_tasks=2).task_strategy == "vmap"
    assert higher.monkeypatch(mlp(), num_tasks=1).task_strategy == "loop"
    # Batched convolutions are grouped ones, slow on a CPU: loop there.
    conv = conv_with(nn.Identity)()
    assert higher.monkeypatch(conv, num_tasks=2).task_strategy == "loop"


def test_outputs_keep_their_structure():
    fmodel = higher.monkeypatch(Attention().double().att, num_tasks=N)
    x = randn(N, 5, 3, 4)
    out, weights = fmodel(x, x, x)
    assert out.shape == (N, 5, 3, 4) and weights.shape == (N, 5, 3, 3)
    out, weights = fmodel(x, x, x, need_weights=False)
    assert weights is None


# -- the rest of the API ---------------------------------------------------------------------
def test_parameters_are_stacked_and_the_initial_ones_broadcast():
    model = mlp()
    fmodel = higher.monkeypatch(model, num_tasks=N, copy_initial_weights=False)
    assert fmodel.num_tasks == N
    for p, q in zip(fmodel.parameters(time=0), model.parameters()):
        assert p.shape == (N, *q.shape)
        assert p.data_ptr() == q.data_ptr()  # a view: no copy


def test_unstacked_params_are_shared_by_all_tasks():
    model = mlp()
    fmodel = higher.monkeypatch(model, num_tasks=N)
    x = randn(N, 5, 2)
    out = fmodel(x, params=list(model.parameters()))
    close(out, torch.stack([model(x[i]) for i in range(N)]))


def test_write_back_takes_a_task():
    model = mlp()
    fmodel = higher.monkeypatch(model, num_tasks=N)
    new = [p * 0 + i for i, p in enumerate(fmodel.fast_params)]
    new[0] = new[0] + torch.arange(N, dtype=torch.float64).view(N, 1, 1)
    fmodel.update_params(new)
    fmodel.write_back(model, task=2)
    assert torch.equal(model[0].weight, torch.full((4, 2), 2.0, dtype=torch.float64))
    assert torch.equal(model[2].bias, torch.full((1,), 3.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"needs the task to write: write_back\(module, task=i\)"):
        fmodel.write_back(model)
    with pytest.raises(ValueError, match="task=3 is out of range for num_tasks=3"):
        fmodel.write_back(model, task=3)


def test_reset_restacks_weights_and_buffers():
    model = conv_with(lambda: nn.BatchNorm2d(3))()
    fmodel = higher.monkeypatch(model, num_tasks=N)
    fmodel(image_data()[0])
    fmodel.reset(model)
    assert fmodel[1].running_mean.shape == (N, 3)
    assert torch.equal(fmodel[1].running_mean, torch.zeros(N, 3, dtype=torch.float64))
    assert fmodel.fast_params[0].shape == (N, 3, 2, 3, 3)


# -- errors ----------------------------------------------------------------------------
def test_a_scalar_loss_is_refused():
    model = mlp()
    xs, ys, _, _ = mlp_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, num_tasks=N) as (fmodel, diffopt):
        with pytest.raises(
            ValueError, match=r"one loss per task, a tensor of shape \(3,\), got \(\)"
        ):
            diffopt.step(mse(fmodel(xs), ys))
        with pytest.raises(ValueError, match=r"shape \(3,\), got \(3, 5, 1\)"):
            diffopt.step((fmodel(xs) - ys) ** 2)


def test_inputs_without_the_task_dimension_are_refused():
    fmodel = higher.monkeypatch(mlp(), num_tasks=N)
    with pytest.raises(
        ValueError, match="num_tasks=3.*positional argument 0 has leading dimension 5"
    ):
        fmodel(randn(5, 2))
    with pytest.raises(ValueError, match="argument 'input' has no dimensions"):
        fmodel(input=torch.tensor(1.0))


def test_bad_params_and_settings_are_refused():
    model = mlp()
    with pytest.raises(ValueError, match="num_tasks must be a positive int, got 0"):
        higher.monkeypatch(model, num_tasks=0)
    fmodel = higher.monkeypatch(model, num_tasks=N)
    with pytest.raises(ValueError, match=r"parameter '0.weight' must have shape \(3, 4, 2\)"):
        fmodel.update_params(
            [torch.zeros(2, 4, 2), torch.zeros(4), torch.zeros(1, 4), torch.zeros(1)]
        )
    with pytest.raises(ValueError, match="task_strategy must be one of"):
        fmodel.task_strategy = "parallel"
    with pytest.warns(UserWarning, match="cannot batch"):
        frnn = higher.monkeypatch(Recurrent(), num_tasks=2)
    with pytest.raises(ValueError, match=r"'vmap' is impossible: .* lstm \(LSTM\)"):
        frnn.task_strategy = "vmap"


# -- benchmark rows ----------------------------------------------------------------------
def test_benchmark_batched_rows_run(capsys):
    import benchmarks.run as bench

    args = "--smoke --batched --workloads W1-sgd1 --repeats 1 --no-memory --device cpu"
    assert bench.main(args.split()) == 0
    table = capsys.readouterr().out
    for impl in ("higher-batched", "higher-batched-vmap", "handwritten-vmap"):
        assert f"| W1-sgd1 | {impl} | " in table


def test_benchmark_reports_an_implementation_that_cannot_run():
    import benchmarks.run as bench
    from benchmarks.workloads import WORKLOADS, HandwrittenImpl, HandwrittenVmapImpl

    class Failing(HandwrittenVmapImpl):
        def meta_backward(self, tasks):
            raise RuntimeError("Batching rule not implemented for aten::lstm.input")

    w = WORKLOADS["W1-sgd1"]
    model = w.make_model()
    tasks = w.make_tasks(torch.device("cpu"))[:2]
    errors = bench.check_agreement([HandwrittenImpl(w, model), Failing(w, model)], tasks)
    assert errors["handwritten-vmap"] == float("inf")
    row = {
        "workload": "W",
        "impl": "x",
        "median_s": None,
        "peak_mb": None,
        "rel_grad_error": errors["handwritten-vmap"],
    }
    assert "not timed: cannot run" in bench._row(row)


def test_benchmark_w2_batched_agrees_with_the_loop_in_float64():
    # Where hand-written vmap is wrong (BatchNorm), batched mode must not be.
    from dataclasses import replace

    from benchmarks.workloads import WORKLOADS, BatchedVmapImpl, HigherImpl, fewshot_tasks

    # W2's network and inner loop, with fewer query images to keep the test short.
    w = replace(WORKLOADS["W2-conv"], inner_steps=1, make_tasks=fewshot_tasks(2, 5, 1, 2))
    model = w.make_model().double()
    tasks = [
        tuple(t.double() if t.is_floating_point() else t for t in task)
        for task in w.make_tasks(torch.device("cpu"))[:2]
    ]
    grads = []
    for impl in (HigherImpl(w, model), BatchedVmapImpl(w, model)):
        model.zero_grad()
        impl.meta_backward(tasks)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    close(grads[1], grads[0], "W2 meta-gradient")


# -- examples ------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["maml", "reptile", "meta-sgd"])
def test_sinusoid_example_batched_equals_per_task_loop(algorithm, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
    import maml_sinusoid

    argv = f"--algorithm {algorithm} --iterations 3 --meta-batch 3 --eval-tasks 4"
    argv += f" --baseline-iterations 1 --device cpu --no-progress --plot {tmp_path / 'p.png'}"
    batched = maml_sinusoid.main(argv.split())
    loop = maml_sinusoid.main([*argv.split(), "--per-task-loop"])
    assert batched["train_curve"] == pytest.approx(loop["train_curve"], rel=1e-5)
    assert batched["mse"] == pytest.approx(loop["mse"], rel=1e-5)


def test_fewshot_example_batched_equals_per_task_loop(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
    import maml_fewshot

    argv = "--num-chars 10 --samples-per-char 4 --ways 3 --queries 2 --iterations 2"
    argv += " --meta-batch 2 --eval-every 1 --eval-tasks 3 --device cpu --no-progress"
    argv += f" --plot {tmp_path / 'p.png'}"
    batched = maml_fewshot.main(argv.split())
    loop = maml_fewshot.main([*argv.split(), "--per-task-loop"])
    assert batched["accuracy"] == pytest.approx(loop["accuracy"], rel=1e-6)
    assert batched["curve"]["train_loss"] == pytest.approx(loop["curve"]["train_loss"], rel=1e-5)


def test_copy_and_pickle_keep_batched_mode():
    import pickle

    model = conv_with(lambda: nn.BatchNorm2d(3))()
    fmodel = higher.monkeypatch(model, num_tasks=N)
    fmodel.task_strategy = "vmap"
    x = image_data()[0]
    fmodel(x)
    for clone in (copy.deepcopy(fmodel), pickle.loads(pickle.dumps(fmodel))):
        assert clone.num_tasks == N and clone.task_strategy == "vmap"
        close(clone(x), fmodel(x))
        assert clone[1].running_mean.shape == (N, 3)


def test_per_task_callback_cannot_skip_a_parameter_for_some_tasks():
    cb = per_task(lambda grads: [None, *grads[1:]])
    with pytest.raises(ValueError, match="returned None for gradient 0"):
        cb([torch.ones(N, 2), torch.ones(N)])


def test_a_single_task_matches_the_plain_inner_loop():
    model = conv_with(lambda: nn.BatchNorm2d(3))()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    x, y = image_data()[:2]
    grads = []
    for num_tasks in (None, 1):
        model.zero_grad()
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=num_tasks) as (
            fmodel,
            diffopt,
        ):
            xs, ys = (x[:1], y[:1]) if num_tasks else (x[0], y[0])
            loss = task_mse if num_tasks else mse
            for _ in range(2):
                diffopt.step(loss(fmodel(xs), ys))
            loss(fmodel(xs), ys).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        mean = fmodel[1].running_mean
    assert mean.shape == (1, 3)
    for a, b in zip(*grads):
        close(b, a)


def test_optimizer_write_back_is_refused_in_batched_mode():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, num_tasks=N) as (fmodel, diffopt):
        diffopt.step(task_mse(fmodel(mlp_data()[0]), mlp_data()[1]))
        with pytest.raises(ValueError, match="batched mode the state is stacked over tasks"):
            diffopt.write_back(opt)


class _Branchy(nn.Module):
    """BatchNorm, then Python control flow on a value: vmap refuses it mid-forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h = self.bn(self.lin(x))
        if bool((h > 0).any()):  # data-dependent control flow
            h = torch.tanh(h)
        return self.out(h)


def test_forward_vmap_cannot_batch_falls_back_to_the_loop_exactly():
    torch.manual_seed(0)
    model = _Branchy().double()
    xs = torch.randn(2, 6, 3, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=2) as (f, d):
        assert f.task_strategy == "vmap"
        with pytest.warns(UserWarning, match="vmap cannot batch this forward .*one after another"):
            d.step(f(xs).pow(2).mean((1, 2)))
        assert f.task_strategy == "loop"  # decided once
        f(xs).pow(2).mean((1, 2)).sum().backward()
        batched = [p.grad.clone() for p in model.parameters()]
        stats = f.bn.running_mean.clone()
    model.zero_grad()
    for i in range(2):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (g, e):
            e.step(g(xs[i]).pow(2).mean())
            g(xs[i]).pow(2).mean().backward()
            # The failed vmap attempt's BatchNorm update was undone: one update per forward.
            torch.testing.assert_close(stats[i], g.bn.running_mean, rtol=1e-12, atol=1e-14)
    for a, p in zip(batched, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-13)
