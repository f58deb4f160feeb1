"""The training step (train/step.py, train/run_stack.py) and ``bench train``'s floor (train/floor.py):
a stack of one is the head's own call, the epoch hook, FLOPs counted by hand, the ratio arithmetic,
the compiled step against the eager one."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.func import vmap

from raml.pipeline import cli
from raml.train.config import make_config
from raml.train.fit import batch_order, fit, fit_runs, prepare_pass
from raml.train.floor import BREAKDOWN_PHASES, FloorProbe, step_breakdown, step_flops
from raml.train.infer import score_rows
from raml.train.model import build_head
from raml.train.run_stack import RunStack, over_runs
from raml.train.split import holdout_split
from raml.train.step import compile_mode

SMALL = dict(epochs=2, lr=1e-3, hidden_dim=32, attn_dim=8, feature_dim=16)


@pytest.fixture(scope="module")
def table(two_category_table):
    return two_category_table


def _pass(table, configs):
    split = holdout_split(table, 0, 0.2)
    step, state, _ = prepare_pass(table, configs, split, torch.device("cpu"))
    generators = [torch.Generator().manual_seed(config.seed) for config in configs]
    return step, state, batch_order(generators, len(split.train), len(split.train) // 16, 16, "cpu")


def test_a_stack_of_one_is_the_heads_own_call_bit_for_bit():
    config = make_config("adaptive", **SMALL)
    torch.manual_seed(0)
    head = build_head(config, 32)
    stack = RunStack([head], [config])
    crops, text_bank, category = torch.randn(1, 16, 21, 32), torch.randn(2, 2, 32), torch.randint(0, 2, (1, 16))
    stacked = stack.forward(crops, text_bank, category)
    alone = head(crops[0], text_bank, category[0])
    assert [tuple(x.shape) for x in stacked] == [(1, 16, 16), (1, 16)]
    assert all(torch.equal(a[0], b) for a, b in zip(stacked, alone))
    assert stack.leaves[0]["fuse.0.weight"].shape == (1, 32, 96)  # the head's own [out, in] layout


def test_over_runs_of_one_run_equals_vmap_and_passes_shared_arguments_whole():
    def weighted(x, shared, scale):
        return (x @ shared) * scale, {"norm": x.norm()}

    x, shared, scale = torch.randn(1, 4, 3), torch.randn(3, 2), torch.tensor([2.0])
    plain = over_runs(weighted, 1, in_dims=(0, None, 0))(x, shared, scale)
    mapped = vmap(weighted, in_dims=(0, None, 0))(x, shared, scale)
    assert torch.allclose(plain[0], mapped[0]) and plain[0].shape == (1, 4, 2)
    assert torch.allclose(plain[1]["norm"], mapped[1]["norm"]) and plain[1]["norm"].shape == (1,)


def test_on_epoch_gets_each_history_entry_in_the_configs_order(table):
    # lr 3e-3 before 1e-3: fit_runs trains them sorted by lr, the hook still sees the callers' order
    configs = [make_config("fixed", seed=1, **{**SMALL, "lr": 3e-3}), make_config("adaptive", seed=0, **SMALL)]
    seen = []
    trained = fit_runs(table, configs, on_epoch=seen.append)
    assert [[record["epoch"] for record in records] for records in seen] == [[1, 1], [2, 2]]
    for epoch, records in enumerate(seen):
        assert records == [trained[0].history[epoch], trained[1].history[epoch]]
    one = []
    alone = fit(table, configs[1], on_epoch=one.append)
    assert one == alone.history and len(one) == 2


def test_a_steps_flops_by_hand(table):
    """The head without attention or text fusion: project (D→h) of the global crop, fuse (h→h, h→h),
    feature head (h→h, h→f), classifier (h→h/4, h/4→1), and the loss's contrastive product f·fᵀ.
    Backward: every product again for the weight and once more for the input, except the first
    layer's input (the cached crops need no gradient); f·fᵀ twice (both operands are f)."""
    config = make_config(
        "adaptive", scales="1", cross_attention=False, text_fusion=False, **{**SMALL, "hidden_dim": 64}
    )
    step, state, order = _pass(table, [config])
    b, d, h, f = 16, 32, 64, 16
    layers = [(d, h), (h, h), (h, h), (h, h), (h, f), (h, h // 4), (h // 4, 1)]
    forward = sum(2 * b * i * o for i, o in layers)
    expected = 3 * forward - 2 * b * d * h + 3 * (2 * b * b * f)
    assert step_flops(step, order[0], state) == expected
    assert all(leaf.grad is None for leaf in step.stack.leaves[0].values())  # counting leaves no gradient


def test_a_pass_counts_the_flops_of_every_run(table):
    counts = []
    for runs in (1, 3):
        step, state, order = _pass(table, [make_config("adaptive", seed=seed, **SMALL) for seed in range(runs)])
        counts.append(step_flops(step, order[0], state))
    assert counts[0] > 0 and counts[1] == 3 * counts[0]


def test_floor_ratios_by_hand():
    probe = FloorProbe(torch.device("cpu"))
    # (wall s, CPU s, GEMM wall GFLOP/s, GEMM CPU GFLOP/s) of three epochs of 10 steps; 1 GFLOP a step
    probe.epochs = [(9.0, 8.0, 100.0, 100.0), (2.0, 1.0, 50.0, 100.0), (1.0, 1.0, 100.0, 100.0)]
    summary = probe.summary(flops=10**9, steps=10)
    # wall ratios: 0.9 s ÷ 10 ms = 90, 0.2 s ÷ 20 ms = 10, 0.1 s ÷ 10 ms = 10; CPU, without the first
    # epoch (the pass's preparation is in its CPU time): 0.1 s ÷ 10 ms = 10 twice
    assert summary["ratio"] == pytest.approx(10.0) and summary["cpu_ratio"] == pytest.approx(10.0)
    assert summary["step_seconds"] == pytest.approx(0.2) and summary["gemm_gflops"] == pytest.approx(100.0)
    assert summary["floor_seconds"] == pytest.approx(0.01)
    assert summary["first_epoch_excess"] == pytest.approx(7.0)  # 9 s against the median epoch's 2 s
    compiled = probe.summary(flops=10**9, steps=10, skip_first=True)  # the epoch that compiled is left out
    assert compiled["step_seconds"] == pytest.approx(0.15) and compiled["ratio"] == pytest.approx(10.0)
    probe.epochs = probe.epochs[:1]
    assert probe.summary(flops=10**9, steps=10)["cpu_ratio"] is None


def test_the_breakdown_times_every_phase_and_trains(table):
    step, state, order = _pass(table, [make_config("adaptive", seed=s, **SMALL) for s in range(2)])
    before = step.stack.leaves[0]["fuse.0.weight"].detach().clone()
    times = step_breakdown(step, state, order[:3])
    assert list(times) == list(BREAKDOWN_PHASES) and all(seconds > 0 for seconds in times.values())
    assert not torch.equal(before, step.stack.leaves[0]["fuse.0.weight"])  # the optimiser stepped


def test_cuda_graphs_on_a_gpu_inductor_on_the_cpu():
    assert compile_mode(torch.device("cuda", 0)) == "reduce-overhead"
    assert compile_mode(torch.device("cpu")) is None


@pytest.mark.slow
def test_a_compiled_step_trains_as_the_eager_one(table):
    configs = [make_config("adaptive", seed=0, **SMALL), make_config("strong", seed=1, **SMALL)]
    eager, compiled, again = (fit_runs(table, configs, compile=compile) for compile in (False, True, True))
    heldout = eager[0].split.heldout
    for a, b, c in zip(eager, compiled, again):
        scores = [score_rows(head.model, table, heldout)["final"] for head in (a, b, c)]
        assert np.abs(scores[0] - scores[1]).max() < 1e-4
        assert np.array_equal(scores[1], scores[2])  # compiled training is deterministic too


@pytest.mark.slow
def test_bench_train_runs_on_mvtec_shape():
    result = CliRunner().invoke(cli, ["bench", "train", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "5354 images" in result.output and "1 epochs × 312 steps" in result.output
    assert "0.310 GFLOP/step" in result.output and "× floor" in result.output and "peak memory" in result.output
    assert all(f"{phase} " in result.output for phase in BREAKDOWN_PHASES)
