"""SET and RigL on the public DPR object (rule="set" / "rigl"), element and block mode, and the ERK
initial distribution: per-tensor counts, zeros through the optimizer, growth by gradient, resume."""
import io

import pytest
import torch
import torch.nn.functional as F

from blockdpr import DPR
from blockdpr.sparsity.packed import BlockSparsity
from test_dpr import batches, state_tensors
from test_dpr import make as make_net


def make(rule, optimizer="sgd", seed=0, **kw):
    """test_dpr's Net and optimizer under `rule` (update every 2 steps; rigl until step 9)."""
    return make_net(optimizer, seed, **{"rule": rule, "alpha": 0.3, **({"t_end": 9} if rule == "rigl" else {}), **kw})


def step(model, opt, dpr, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return dpr.step()


@pytest.mark.parametrize("rule,optimizer", [("set", "sgd"), ("rigl", "adamw"), ("set", "adamw"), ("rigl", "sgd")])
def test_element_rules_conserve_each_tensor_and_keep_the_zero_invariants(rule, optimizer):
    model, opt, dpr = make(rule, optimizer, sparsity=0.8)
    params, masks = dpr.structure.params, dpr.structure.masks
    counts = [int(m.sum()) for m in masks]
    updates = 0
    for i, (x, y) in enumerate(batches(12)):
        before = [m.clone() for m in masks]
        if rule == "rigl":
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads = [p.grad.clone() for p in params]
            result = dpr.step()
        else:
            result = step(model, opt, dpr, x, y)
        assert [int(m.sum()) for m in masks] == counts  # per tensor, at every step
        for p, m in zip(params, masks):
            assert torch.all(p[~m] == 0)
            assert all(torch.all(s[~m] == 0) for s in state_tensors(opt, p))
        if result is None:
            continue
        updates += 1
        for p, m, b in zip(params, masks, before):
            grown = m & ~b
            assert torch.all(p[grown] == 0)  # regrown at zero with zero state
            assert all(torch.all(s[grown] == 0) for s in state_tensors(opt, p))
        if rule == "rigl":  # grown: among the inactive, those of largest |g| (of this step, before masking)
            for g, m, b in zip(grads, masks, before):
                grown = m & ~b
                if grown.any() and (~b & ~grown).any():
                    assert g.abs()[grown].min() >= g.abs()[~b & ~grown].max()
    # period 2 (rigl: t_end 9 -> updates at steps 2, 4, 6, 8)
    assert updates == (6 if rule == "set" else 4)
    assert dpr.rule == rule


def test_rigl_drop_fraction_decays_by_a_cosine_and_stops_at_t_end():
    model, opt, dpr = make("rigl", t_end=8)
    fractions = {}
    for i, (x, y) in enumerate(batches(10)):
        result = step(model, opt, dpr, x, y)
        if result is not None:
            fractions[dpr.steps] = result.drop_fraction
    assert sorted(fractions) == [2, 4, 6]
    assert fractions[2] == pytest.approx(0.15 * (1 + 0.7071067811865476))
    assert fractions[4] == pytest.approx(0.15) and fractions[6] < fractions[4]


def test_block_rigl_captures_the_dense_gradient_only_for_update_steps():
    model, opt, dpr = make("rigl", granularity="block", block=16, sparsity=0.5, period=3, t_end=20)
    assert isinstance(dpr.structure, BlockSparsity)
    layers = dpr.structure.layers
    counts = dpr.structure.segments.count(dpr.structure.flat_mask()).tolist()
    moved = 0
    for x, y in batches(7):
        hooked = dpr.steps + 1 in (3, 6)  # the steps that end with an update
        assert all(bool(m._forward_hooks) == hooked for m in layers)
        before = dpr.structure.flat_mask().clone()
        result = step(model, opt, dpr, x, y)
        assert (result is not None) == hooked
        assert dpr.structure.segments.count(dpr.structure.flat_mask()).tolist() == counts
        moved += int((dpr.structure.flat_mask() & ~before).sum())
    assert moved > 0


@pytest.mark.parametrize("rule,granularity", [("set", "element"), ("rigl", "element"), ("rigl", "block")])
def test_rules_resume_bit_identically_from_state_dicts(rule, granularity):
    kw = dict(granularity=granularity, sparsity=0.5, **({"block": 16} if granularity == "block" else {}))
    data = batches(9)
    model, opt, dpr = make(rule, **kw)
    for x, y in data:
        step(model, opt, dpr, x, y)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, dpr = make(rule, **kw)
    for x, y in data[:5]:
        step(model, opt, dpr, x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "dpr": dpr.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opt, dpr = make(rule, **kw)
    dpr.load_state_dict(saved["dpr"])
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    for x, y in data[5:]:
        step(model, opt, dpr, x, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_state_of_another_rule_is_refused():
    _, _, dsr = make("dsr", target_pruned=0.2)
    _, _, set_ = make("set")
    with pytest.raises(ValueError, match="rule 'dsr' differs"):
        set_.load_state_dict(dsr.state_dict())


def test_erk_gives_small_layers_more_density_within_the_budget():
    _, _, uniform = make("set", sparsity=0.8)
    _, _, erk = make("set", sparsity=0.8, distribution="erk")
    u, e = uniform.densities(), erk.densities()
    numel = dict(zip(erk.names, erk.structure.dense_numels))
    total = sum(numel.values())
    assert sum(e[n] * numel[n] for n in e) == pytest.approx(sum(u[n] * numel[n] for n in u), abs=3 / total * total)
    assert len({round(d, 3) for d in e.values()}) > 1  # not uniform
    assert e["odd.weight"] > e["conv.weight"]  # 1x1 32->24 has fewer weights than 3x3 16->32


def test_bad_rule_settings_are_named():
    with pytest.raises(ValueError, match="rule must be one of"):
        make("magnitude")
    with pytest.raises(ValueError, match="needs t_end"):
        make("rigl", t_end=None)
    with pytest.raises(ValueError, match="alpha"):
        make("set", alpha=0.0)
    with pytest.raises(ValueError, match="distribution must be one of"):
        make("set", distribution="er")
