"""Block mode in place: a reallocation rewrites the one packed Parameter, its optimizer state and the layouts
in the same storage, also when blocks move between layers (captured graphs stay valid); only a new total
replaces the Parameter. A layout alone (BlockLayout.update_) is rewritten in place for the same count."""

import collections

import pytest
import torch
import torch.nn.functional as F

from blockdpr import engine as engine_lib
from blockdpr.engine import Engine
from blockdpr.train import parse_configs
from blockdpr_kernels import BlockLayout
from blockdpr_kernels.testing import record_work
from test_block_mode import paired_models, sgd
from tiny import TINY

LAYOUT_TENSORS = ("row_ptr", "col_idx", "row_idx", "col_ptr", "col_row_idx", "col_perm", "wgrad_groups",
                  "wgrad_counters", "row_prefix")


def same_count_masks(grid, nnz, generator, n):
    """n random bool masks over `grid` with exactly `nnz` True entries each (including empty and full)."""
    for _ in range(n):
        flat = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=generator)[:nnz]] = True
        yield flat.view(grid)


@pytest.mark.parametrize("grid,bk", [((5, 7), 16), ((3, 9), 32), ((4, 4), 64), ((1, 6), 16)])
def test_update_in_place_equals_a_fresh_layout_and_keeps_every_tensor(grid, bk):
    gen = torch.Generator().manual_seed(0)
    for nnz in (0, 1, grid[0] * grid[1] // 2, grid[0] * grid[1]):
        first, *others = same_count_masks(grid, nnz, gen, 6)
        layout = BlockLayout(first, (16, bk))
        pointers = {n: getattr(layout, n).data_ptr() for n in LAYOUT_TENSORS}
        for mask in others:
            layout.wgrad_counters.fill_(3)  # as a crashed launch could leave them: update_ zeroes them
            layout.update_(mask)
            fresh = BlockLayout(mask, (16, bk))
            assert layout.nnz == fresh.nnz == nnz and torch.equal(layout.mask, mask)
            for name in LAYOUT_TENSORS:
                mine, theirs = getattr(layout, name), getattr(fresh, name)
                assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name
                assert mine.data_ptr() == pointers[name], f"{name} got new storage"


def test_update_refuses_a_mask_of_another_grid():
    layout = BlockLayout(torch.ones(2, 3, dtype=torch.bool), (16, 16))
    with pytest.raises(ValueError, match=r"block grid \(2, 3\)"):
        layout.update_(torch.ones(3, 2, dtype=torch.bool))


def test_the_layout_matches_the_packing_it_describes():
    """Semantic check of the device-built index tensors against their documented meaning."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(6, 9, generator=gen) < 0.4
    layout = BlockLayout(mask, (16, 16))
    rows, cols = mask.nonzero(as_tuple=True)
    assert torch.equal(layout.row_idx.long(), rows) and torch.equal(layout.col_idx.long(), cols)
    for n in range(6):
        assert torch.equal(layout.row_idx[layout.row_ptr[n]:layout.row_ptr[n + 1]].long(), torch.full_like(
            rows[rows == n], n))
    for k in range(9):
        entries = slice(layout.col_ptr[k], layout.col_ptr[k + 1])
        assert torch.equal(layout.col_row_idx[entries].long(), rows[cols == k])
        assert torch.equal(layout.col_idx[layout.col_perm[entries].long()].long(), cols[cols == k])
    runs = layout.wgrad_groups.long()
    used = runs[runs[:, 1] > runs[:, 0]]
    covered = torch.cat([torch.arange(a, b) for a, b in used.tolist()])
    assert torch.equal(covered, torch.arange(layout.nnz)) and (runs[runs[:, 1] == runs[:, 0]] == 0).all()


def trained(sparsity=0.6):
    """A packed WRN-10-1 after one SGD step with momentum, with its block sparsity and optimizer."""
    _, _, model, structure = paired_models(sparsity=sparsity)
    opt = sgd(model)
    x, y = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(4)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return model, structure, opt


def expected_after(layer, state, keep, new):
    """What the rebuild path gives: values / momentum of the survivors, zeros for regrown blocks, as dense."""
    keep = keep.view(layer.layout.grid)
    dense = {k: layer.layout.unpack(v) for k, v in [("values", layer.values.detach()), *state.items()]}
    scale = keep.repeat_interleave(layer.block[0], 0).repeat_interleave(layer.block[1], 1)
    target = BlockLayout(new.view(layer.layout.grid), layer.block)
    return {k: target.pack(d * scale) for k, d in dense.items()}


def move_blocks(structure, gen):
    """survived, regrown: each layer drops a third of its blocks; as many regrow at random over all layers'
    free blocks, so per-layer counts change and the total does not."""
    mask = structure.flat_mask()
    active, free = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
    positions = structure.segments.split(torch.arange(len(mask)))
    drop = torch.cat([a[torch.randperm(len(a), generator=gen)[:len(a) // 3]]
                      for a in (p[m] for p, m in zip(positions, structure.segments.split(mask)))])
    grow = free[torch.randperm(len(free), generator=gen)[:len(drop)]]
    survived, regrown = mask.clone(), torch.zeros_like(mask)
    survived[drop], regrown[grow] = False, True
    return survived, regrown


def test_a_reallocation_moving_blocks_between_layers_is_in_place_and_equals_the_rebuild():
    model, structure, opt = trained()
    gen = torch.Generator().manual_seed(2)
    survived, regrown = move_blocks(structure, gen)
    values = structure.params[0]
    momentum = opt.state[values]["momentum_buffer"]
    pointers = (values.data_ptr(), momentum.data_ptr())
    before = [m.layout.nnz for m in structure.layers]
    expected = [expected_after(m, {"momentum_buffer": buf}, keep, new)
                for m, buf, keep, new in zip(structure.layers, structure.split_rows(momentum),
                                             structure.segments.split(survived),
                                             structure.segments.split(survived | regrown))]
    with record_work() as work:
        structure.set_structure(survived, regrown, opt)
    assert not structure.params_replaced
    assert work.syncs == collections.Counter({"tolist": 1}), "one read of all layers' counts, nothing per layer"
    assert [m.layout.nnz for m in structure.layers] != before, "the test must change per-layer counts"
    assert structure.params[0] is values and (values.data_ptr(), momentum.data_ptr()) == pointers
    assert opt.state[values]["momentum_buffer"] is momentum
    for m, want, rows, buf, new in zip(structure.layers, expected, structure.split_rows(values.detach()),
                                       structure.split_rows(momentum), structure.segments.split(survived | regrown)):
        assert torch.equal(rows, want["values"]) and torch.equal(m.values.detach(), want["values"])
        assert torch.equal(buf, want["momentum_buffer"])
        assert torch.equal(m.layout.mask.reshape(-1), new)
    assert not values.grad.any(), "a gradient in the old packed order would be stale: zeroed"
    assert [q for g in opt.param_groups for q in g["params"] if q.dim() == 3] == [values]


def test_host_known_counts_save_the_read_and_a_new_total_replaces_the_one_parameter():
    model, structure, opt = trained()
    survived, regrown = move_blocks(structure, torch.Generator().manual_seed(3))
    counts = structure.segments.count(survived | regrown).tolist()
    with record_work() as work:
        structure.set_structure(survived, regrown, opt, counts=counts)
    assert work.syncs == collections.Counter(), "the host knew the counts: nothing read back"
    values = structure.params[0]
    survived = structure.flat_mask().clone()
    survived[survived.nonzero()[0]] = False  # one block pruned, nothing regrows: a new total
    with record_work() as work:
        structure.set_structure(survived, torch.zeros_like(survived), opt)
    assert structure.params_replaced and structure.params[0] is not values
    assert structure.storage.total == len(values) - 1 and sum(m.layout.nnz for m in structure.layers) == len(values) - 1
    held = {id(q) for g in opt.param_groups for q in g["params"]}
    assert id(structure.params[0]) in held and id(values) not in held
    assert all(m._parameters["packed"] is structure.params[0] for m in structure.layers)
    assert work.syncs == collections.Counter({"tolist": 1}), "no per-layer sync on the rebuild path either"


def block_engine(tmp_path, tiny_cifar, rule):
    flags = [*TINY, "--data", str(tiny_cifar), "--train-subset", "100", "--test-subset", "20",
             "--granularity", "block", "--block-size", "16", "--mode", "dpr", "--rule", rule,
             "--realloc-periods", "0:1", "--target-pruned", "10", "--initial-threshold", "0.05",
             "--out", str(tmp_path / "run")]
    return Engine(parse_configs(flags))


@pytest.mark.parametrize("rule", ["set", "dsr"])
def test_block_reallocations_in_the_engine_keep_every_parameter_and_its_graphs(tmp_path, tiny_cifar, monkeypatch,
                                                                               rule):
    calls = []
    monkeypatch.setattr(Engine, "invalidate_graphs", lambda self: calls.append(1))
    trainer = block_engine(tmp_path, tiny_cifar, rule)
    trainer.start_epoch(0)
    params = list(trainer.dprs[0].structure.params)
    reallocations = sum(len(trainer.step(step)) for step in range(4))
    with record_work() as work:
        reallocations += len(trainer.step(4))
    assert reallocations == 5
    # set: one read of all layers' counts; dsr: the reallocator's one read (its counts out, r_i back), which
    # gives the host the new counts too, as in element mode
    syncs = {"set": {"tolist": 1}, "dsr": {"numpy": 1, "from_host": 1}}[rule]
    assert work.syncs == collections.Counter(syncs), "no sync per layer in a block-mode reallocation"
    assert all(a is b for a, b in zip(params, trainer.dprs[0].structure.params))
    assert not calls, f"{len(calls)} invalidations in 5 {rule} reallocations"


def test_a_compiled_block_engine_leaves_dynamos_parameter_shape_flag_as_it_was(tmp_path, tiny_cifar, monkeypatch):
    """The flag is turned off only inside the compiled model's calls (DynamicParameterShapes)."""
    config = torch._dynamo.config
    if not hasattr(config, "force_parameter_static_shapes"):
        pytest.skip("this torch has no force_parameter_static_shapes")
    monkeypatch.setattr(config, "force_parameter_static_shapes", True, raising=False)
    seen = []

    class Spy(torch.nn.Module):  # stands in for torch.compile's module: records the flag at each call
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args):
            seen.append(config.force_parameter_static_shapes)
            return self.model(*args)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: Spy(model))  # the scoping, not inductor, is tested
    trainer = Engine(parse_configs([*TINY, "--data", str(tiny_cifar), "--train-subset", "40", "--test-subset", "20",
                                    "--granularity", "block", "--block-size", "16", "--compile",
                                    "--out", str(tmp_path / "run")]))
    assert config.force_parameter_static_shapes is True
    trainer.start_epoch(0)
    trainer.step(0)
    assert seen and not any(seen), "the compiled calls ran with the flag off"
    assert config.force_parameter_static_shapes is True, "the process-wide value is restored"


@pytest.mark.parametrize("rule", ["set", "dsr"])
def test_a_block_run_on_static_buffers_keeps_one_static_call_and_equals_eager(tmp_path, tiny_cifar, monkeypatch,
                                                                              rule):
    """--cuda-graph semantics on CPU: the step on static buffers (StaticCall static=True, what a graph
    captures) through 5 reallocations (dsr: blocks move between layers) is never invalidated, reads the
    same Parameters and buffers throughout, and ends bit-identical to the eager run."""
    from blockdpr.step import StaticCall
    calls = []
    monkeypatch.setattr(Engine, "invalidate_graphs", lambda self: calls.append(1))
    finals = {}
    for static in (False, True):
        trainer = block_engine(tmp_path / str(static), tiny_cifar, rule)
        trainer.step_fn.call = StaticCall(trainer.step_fn.compute, static=static)
        trainer.start_epoch(0)
        params = list(trainer.model.parameters())
        counts = [m.layout.nnz for m in trainer.dprs[0].structure.layers]
        assert sum(len(trainer.step(step)) for step in range(5)) == 5
        moved = counts != [m.layout.nnz for m in trainer.dprs[0].structure.layers]
        assert moved == (rule == "dsr"), "dsr moves blocks between layers, set within them"
        assert all(a is b for a, b in zip(params, trainer.model.parameters()))
        if static:
            assert len(trainer.step_fn.call._buffers) == 1, "one set of static buffers for the whole run"
        finals[static] = [p.detach().clone() for p in params] + [trainer.step_fn.loss_sum.clone()]
    assert not calls, f"{len(calls)} invalidations"
    assert all(torch.equal(a, b) for a, b in zip(finals[False], finals[True]))
