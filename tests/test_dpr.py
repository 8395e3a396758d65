"""The public DPR object on a model it did not design: layer choice, the schedule, the invariants
through SGD and AdamW, element and block mode, state_dict resume, data parallel, torch.compile."""

import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from blockdpr import DPR, EpochSchedule
from blockdpr_kernels import BlockSparseConv2d, BlockSparseLinear


class Net(nn.Module):
    """stem conv 3->16, conv 16->32 (3x3), odd conv 32->24 (1x1: block 16 does not tile it), fc1 24->32
    (not tiled either), fc2 32->32, head 32->10."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.odd = nn.Conv2d(32, 24, 1)
        self.fc1 = nn.Linear(24, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv(F.relu(self.stem(x))))
        x = F.relu(self.odd(x)).mean(dim=(2, 3))
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def make(optimizer="sgd", seed=0, **kw):
    torch.manual_seed(seed)
    model = Net()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    kw = {"period": 2, "target_pruned": 0.2, "initial_threshold": 0.05, **kw}
    return model, opt, DPR(model, opt, **kw)


def batches(n, seed=1, size=8):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=gen), torch.randint(0, 10, (size,), generator=gen)) for _ in range(n)]


def train(model, opt, dpr, data, check=None):
    results = []
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        result = dpr.step()
        if check:
            check(result)
        results.append(result)
    return results


def state_tensors(opt, p):
    return [v for v in opt.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]


def test_default_layers_are_all_but_the_first_conv_and_the_last_linear():
    _, _, dpr = make()
    assert dpr.names == ["conv.weight", "odd.weight", "fc1.weight", "fc2.weight"]
    _, _, only = make(include=lambda module, name: isinstance(module, nn.Linear) and name != "head")
    assert only.names == ["fc1.weight", "fc2.weight"]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_element_invariants_through_the_optimizer(optimizer):
    model, opt, dpr = make(optimizer, sparsity=0.8)
    params, masks = dpr.structure.params, dpr.structure.masks
    active = sum(int(m.sum()) for m in masks)
    assert active == sum(max(1, int(0.2 * p.numel() + 0.1)) for p in params)
    seen = []

    def check(result):
        assert sum(int(m.sum()) for m in masks) == active, "exact active count"
        for p, m in zip(params, masks):
            assert torch.count_nonzero(p[~m]) == 0, "masked weights exactly zero"
            for s in state_tensors(opt, p):
                assert torch.count_nonzero(s[~m]) == 0, "masked optimizer state exactly zero"
        if result is not None:
            seen.append(result)
            for p, grow in zip(params, dpr.structure.segments.split(result.regrown)):
                assert torch.count_nonzero(p.detach().reshape(-1)[grow]) == 0, "regrown weights start at zero"
                for s in state_tensors(opt, p):
                    assert torch.count_nonzero(s.reshape(-1)[grow]) == 0, "regrown units start with zero state"
            if optimizer == "adamw":
                assert all(float(opt.state[p]["step"]) == dpr.steps for p in params), "Adam's step is kept"

    train(model, opt, dpr, batches(8), check)
    assert len(seen) == 4 and sum(r.pruned for r in seen) > 0


def test_threshold_halves_above_and_doubles_below_the_target():
    model, opt, dpr = make(sparsity=0.5, period=1, target_pruned=10, tolerance=0.1, initial_threshold=0.05)
    for result in train(model, opt, dpr, batches(6)):
        k = result.pruned
        expected = result.threshold_used / 2 if k > 11 else result.threshold_used * 2 if k < 9 else result.threshold_used
        assert result.threshold_next == expected


def test_schedule_in_steps_period_function_and_stop_step():
    schedule = EpochSchedule(3, ((0, 1), (2, 3)))  # 3 steps an epoch: period 1 in epochs 0-1, then 3
    assert [schedule(i) for i in range(9)] == [1, 1, 1, 1, 1, 1, 3, 3, 3]
    assert EpochSchedule(391)(0) == 100 and EpochSchedule(391)(25 * 391) == 200  # the paper's periods
    model, opt, dpr = make(period=schedule, stop_step=9)
    due = [r is not None for r in train(model, opt, dpr, batches(12))]
    assert due == [True] * 6 + [False, False, True] + [False] * 3  # step 12 is past stop_step
    assert dpr.steps == 12


def test_target_pruned_fraction_or_count():
    _, _, dpr = make(sparsity=0.9, target_pruned=0.138)
    active = int(dpr.structure.flat_mask().sum())
    assert dpr.target_pruned == round(0.138 * active)
    assert make(target_pruned=7)[2].target_pruned == 7


@pytest.mark.parametrize("kw, message", [
    ({"granularity": "block", "block": 48}, r"block=48 must be one of \(16, 32, 64\) for convolutions"),
    ({"granularity": "row"}, "granularity must be 'element' or 'block'"),
    ({"sparsity": 1.0}, r"sparsity must be in \(0, 1\)"),
    ({"target_pruned": 1.5}, "fraction of the active units must be in"),
    ({"period": 0}, "period must be a positive int"),
    ({"tolerance": 1.0}, r"tolerance must be in \[0, 1\)"),
    ({"include": lambda m, n: False}, "no layer to make sparse"),
    ({"granularity": "block", "block": 16, "keep_momentum": True}, "keep_momentum has no meaning in block mode"),
])
def test_errors_speak_library_words(kw, message):
    with pytest.raises(ValueError, match=message) as e:
        make(**kw)
    assert "--" not in str(e.value)


def test_a_bad_setting_leaves_the_model_and_optimizer_as_they_were():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p for g in opt.param_groups for p in g["params"]]
    for bad in ({"keep_momentum": True}, {"tolerance": 1.5}, {"target_pruned": -3}, {"stop_step": -1}):
        with pytest.raises(ValueError):
            DPR(model, opt, granularity="block", block=16, **bad)
        assert isinstance(model.conv, nn.Conv2d) and [p for g in opt.param_groups for p in g["params"]] == before


def test_block_mode_replaces_layers_in_place_and_keeps_the_invariants():
    model, opt, dpr = make(sparsity=0.5, granularity="block", block=16, target_pruned=2, initial_threshold=0.1)
    assert isinstance(model.conv, BlockSparseConv2d) and isinstance(model.fc2, BlockSparseLinear)
    assert dpr.dense_layers == ["odd.weight", "fc1.weight"]
    assert isinstance(model.odd, nn.Conv2d) and isinstance(model.fc1, nn.Linear)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert set(held) == set(model.parameters()), "the optimizer holds the packed values and the new biases"
    assert len(held) == len(set(held)) and sum(p.dim() == 3 for p in held) == 1, "one packed Parameter, held once"
    layers = dpr.structure.layers
    blocks = sum(m.layout.nnz for m in layers)
    moved = 0

    def check(result):
        nonlocal moved
        assert sum(m.layout.nnz for m in layers) == blocks, "exact active block count"
        packed = dpr.structure.params[0]
        states = state_tensors(opt, packed)
        assert states and all(s.shape == packed.shape == (blocks, 16, 16) for s in states)
        per_layer = [dpr.structure.split_rows(s) for s in states]  # [state][layer]: [nnz_i, 16, 16]
        for m in layers:
            assert m.values.shape == (m.layout.nnz, 16, 16)
        if result is not None:
            moved += result.pruned
            for i, (m, grow) in enumerate(zip(layers, dpr.structure.segments.split(result.regrown))):
                position = torch.cumsum(m.layout.mask.reshape(-1), 0) - 1  # packed index of an active block
                regrown = position[grow]
                assert torch.count_nonzero(m.values[regrown]) == 0, "regrown blocks start at zero"
                for s in per_layer:
                    assert torch.count_nonzero(s[i][regrown]) == 0, "regrown blocks start with zero state"

    train(model, opt, dpr, batches(6), check)
    assert moved > 0


def test_block_mode_needs_the_sparse_weights_in_one_kind_of_param_group():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD([{"params": [model.conv.weight], "lr": 0.1}, {"params": [model.fc2.weight], "lr": 0.2},
                           {"params": [p for n, p in model.named_parameters() if n not in ("conv.weight", "fc2.weight")]}],
                          lr=0.1, momentum=0.9)
    held = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(ValueError, match="one optimizer param group"):
        DPR(model, opt, 0.5, granularity="block", block=16)
    assert isinstance(model.conv, nn.Conv2d) and [g["params"] for g in opt.param_groups] == held, "nothing changed"


@pytest.mark.parametrize("granularity", ["element", "block"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_state_dict_resume_in_a_fresh_object_is_bit_identical(granularity, optimizer):
    kw = {"granularity": granularity, "block": 16, "sparsity": 0.5, "target_pruned": 2 if granularity == "block" else 20}
    data = batches(8)
    ref_model, ref_opt, ref_dpr = make(optimizer, **kw)
    train(ref_model, ref_opt, ref_dpr, data)

    model, opt, dpr = make(optimizer, **kw)
    train(model, opt, dpr, data[:5])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "dpr": dpr.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh_model, fresh_opt, fresh = make(optimizer, seed=123, **{**kw, "initial_threshold": 0.5})  # other init: all is loaded
    fresh.load_state_dict(ckpt["dpr"])
    fresh_model.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["optim"])
    train(fresh_model, fresh_opt, fresh, data[5:])

    assert fresh.steps == ref_dpr.steps and fresh.threshold == ref_dpr.threshold
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, fresh_model.state_dict()[k]), k
    for a, b in zip(ref_dpr.structure.state_dict().values(), fresh.structure.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(ref_dpr.structure.params, fresh.structure.params):
        for s, t in zip(state_tensors(ref_opt, p), state_tensors(fresh_opt, q)):
            assert torch.equal(s, t)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, granularity: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, opt, dpr = make(granularity=granularity, block=16, sparsity=0.5, period=1,
                               target_pruned=2 if granularity == "block" else 20)
        for x, y in batches(4, seed=10 + rank):  # each rank its own data
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= 2
            dpr.step()
        results[rank] = torch.cat([m.reshape(-1) for m in dpr.structure.state_dict().values()])
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_gloo_available(), reason="gloo backend not built into this torch")
@pytest.mark.parametrize("granularity", ["element", "block"])
def test_data_parallel_ranks_get_the_same_masks_without_communication(granularity):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(_free_port(), granularity, results), nprocs=2, join=True)
        masks = dict(results)
    assert torch.equal(masks[0], masks[1])
    _, _, initial = make(granularity=granularity, block=16, sparsity=0.5)
    start = torch.cat([m.reshape(-1) for m in initial.structure.state_dict().values()])
    assert not torch.equal(masks[0], start), "the masks moved"


def test_compiled_model_does_not_recompile_at_a_reallocation():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, opt, dpr = make(sparsity=0.5, period=1, target_pruned=20)
    counter = CompileCounter()
    net = torch.compile(model, backend=counter)
    moved = 0
    for x, y in batches(4):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        moved += dpr.step().pruned
    assert moved > 0 and counter.frame_count == 1, f"{counter.frame_count} compiles for 4 steps with 4 reallocations"


def test_compiled_block_model_recompiles_once_for_the_dynamic_block_count(monkeypatch):
    """Block mode reallocates in place, but on the CPU reference backend a layer computes over its own
    blocks, whose count is a tensor size: with dynamic parameter shapes dynamo compiles once more (the
    count becomes symbolic), then never again."""
    from torch._dynamo.testing import CompileCounter

    monkeypatch.setattr(torch._dynamo.config, "force_parameter_static_shapes", False, raising=False)
    torch._dynamo.reset()
    model, opt, dpr = make(sparsity=0.5, period=1, granularity="block", block=16, target_pruned=2, initial_threshold=0.1)
    counter = CompileCounter()
    net = torch.compile(model, backend=counter)
    frames, moved = [], 0
    for x, y in batches(5):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        moved += dpr.step().pruned
        frames.append(counter.frame_count)
    assert moved > 0 and frames[-1] <= 2 and frames[-1] == frames[1], f"compiles after each step: {frames}"
