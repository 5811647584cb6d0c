import math

import pytest
import torch
from torch import nn

from qlrlora.adapter import LRLoRALinear
from qlrlora.export import adapters_from_layers


def nf4_copy(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
    )
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


class Holder(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def trained_layer(base: nn.Module, **kwargs) -> LRLoRALinear:
    """An LR-LoRA layer whose B is random, as after some training, so that its branch contributes."""
    layer = LRLoRALinear(base, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("base_kind", ["bf16", "nf4"])
def test_saturated_rank_equals_peft_rslora(base_kind):
    """Invariant 1: rank fixed at r_max and temperature -> 0 is rsLoRA of rank r_max (PEFT as reference)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    r_max, alpha = 8, 16.0
    linear = nn.Linear(128, 64, bias=True).to(torch.bfloat16)
    base = nf4_copy(linear) if base_kind == "nf4" else linear
    reference = get_peft_model(
        Holder(nf4_copy(linear) if base_kind == "nf4" else nn.Linear(128, 64).to(torch.bfloat16)),
        LoraConfig(r=r_max, lora_alpha=alpha, use_rslora=True, target_modules=["proj"], lora_dropout=0.0),
    )
    if base_kind == "bf16":
        reference.base_model.model.proj.base_layer.load_state_dict(linear.state_dict())
    layer = LRLoRALinear(base, r_max=r_max, init_rank=r_max, alpha=alpha, dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_()
        peft_proj = reference.base_model.model.proj
        peft_proj.lora_A["default"].weight.copy_(layer.lora_A)
        peft_proj.lora_B["default"].weight.copy_(layer.lora_B)
    assert peft_proj.scaling["default"] == pytest.approx(alpha / math.sqrt(r_max))
    assert torch.equal(layer.rank_mask(), torch.ones(r_max))

    x = torch.randn(4, 10, 128, dtype=torch.bfloat16)
    ours, theirs = layer(x), reference(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    # Same bf16 base output plus an fp32 adapter path on both sides: equal up to the final bf16 rounding.
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-2, atol=1e-2)
    assert (ours.float() - theirs.float()).abs().max() <= (theirs.float().abs().max() * 2**-7)
    delta = (ours.float() - layer.base(x).float()).abs().mean()
    assert delta > 0.1  # the adapter really contributes, so the comparison means something


def test_bf16_adapter_matches_fp32_reference_with_the_hard_mask():
    torch.manual_seed(0)
    layer = trained_layer(nn.Linear(64, 32), r_max=16, init_rank=5.3, alpha=8.0, dtype=torch.bfloat16)
    x = torch.randn(8, 64)
    mask = (torch.arange(16) < 5).float()  # rank 5.3: components 0..4 on, the rest off
    assert torch.equal(layer.rank_mask(), mask)
    expected = layer.base(x) + (x @ layer.lora_A.float().t() * mask * layer.scaling) @ layer.lora_B.float().t()
    torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)


def test_rank_is_fp32_and_gets_gradient_with_bf16_factors():
    torch.manual_seed(0)
    layer = LRLoRALinear(nn.Linear(32, 32).to(torch.bfloat16), r_max=8, init_rank=4, alpha=8.0)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    assert layer.rank.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(torch.randn(4, 32, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    grad = layer.ranks.values.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
    assert all(not p.requires_grad for p in layer.base.parameters())
    assert not any(p is layer.ranks.values for p in layer.parameters())  # not a parameter of the model


def test_hard_rank_rounds_the_continuous_rank():
    layer = LRLoRALinear(nn.Linear(16, 16), r_max=12, init_rank=5.3, alpha=1.0)
    assert layer.hard_rank() == 5
    for value, hard in ((0.49, 0), (0.5, 1), (5.5, 6), (11.7, 12), (12.0, 12)):
        with torch.no_grad():
            layer.ranks.values.fill_(value)
        assert layer.hard_rank() == hard == int(layer.rank_mask().sum())


def test_the_forward_uses_exactly_the_components_the_export_keeps():
    torch.manual_seed(0)
    layer = trained_layer(nn.Linear(48, 40), r_max=10, init_rank=4.2, alpha=3.0, dtype=torch.float32)
    kept = adapters_from_layers({"layer": layer})["layer"]
    assert kept.A.shape == (4, 48) and kept.B.shape == (40, 4)
    torch.testing.assert_close(kept.scale * kept.B @ kept.A, layer.delta_weight())
    x = torch.randn(5, 48)
    exported = layer.base(x) + kept.scale * x @ kept.A.t() @ kept.B.t()
    torch.testing.assert_close(layer(x), exported, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.lora_B[:, 4:].add_(100.0)  # components past the hard rank have no effect on the output
    torch.testing.assert_close(layer(x), exported, rtol=1e-5, atol=1e-5)


def test_rank_zero_layer_exports_nothing():
    layer = LRLoRALinear(nn.Linear(8, 8), r_max=4, init_rank=0.0, alpha=1.0)
    kept = adapters_from_layers({"layer": layer})["layer"]
    assert kept.A.shape == (0, 8) and kept.B.shape == (8, 0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), layer.base(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"r_max": 0, "init_rank": 0}, "r_max must be >= 1"), ({"r_max": 4, "init_rank": 5}, "init_rank must be in")],
)
def test_bad_ranks_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LRLoRALinear(nn.Linear(8, 8), alpha=1.0, **kwargs)


def test_only_linear_layers_can_be_wrapped():
    with pytest.raises(TypeError, match="nn.Linear or bitsandbytes Linear4bit"):
        LRLoRALinear(nn.Embedding(10, 8), r_max=2, init_rank=1, alpha=1.0)


def reference_delta(layer: LRLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The adapter branch written out with plain torch ops over every component: the hard mask forward,
    the soft mask's gradient."""
    soft = torch.sigmoid((layer.rank - torch.arange(layer.r_max, dtype=torch.float32) - 0.5) / layer.ranks.temperature)
    mask = layer.rank_mask() + soft - soft.detach()  # straight-through: the value of the hard mask
    h = x.to(layer.lora_A.dtype) @ layer.lora_A.t()
    return (h * (mask * layer.scaling).to(h.dtype)) @ layer.lora_B.t()


def branch_grads(layer: LRLoRALinear, x: torch.Tensor, upstream: torch.Tensor, ours: bool):
    """The output and the gradients of x, lora_A, lora_B and the rank vector, by our layer or the reference."""
    for t in (x, layer.lora_A, layer.lora_B, layer.ranks.values):
        t.grad = None
    output = layer(x) if ours else reference_delta(layer, x).float()
    (output.float() * upstream).sum().backward()
    return output, (x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.ranks.values.grad)


def adapter_only(r_max: int, rank: float, temperature: float, dtype=torch.float32, features=(40, 24)) -> LRLoRALinear:
    """A layer whose output is its adapter branch alone (base weights zero), with a random B."""
    layer = LRLoRALinear(nn.Linear(*features, bias=False), r_max=r_max, init_rank=rank, alpha=6.0, dtype=dtype)
    layer.ranks.temperature = temperature
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.base.weight.zero_()
    return layer


def assert_grads_close(ours, theirs, tol, names=("x", "lora_A", "lora_B", "rank")):
    for name, a, b in zip(names, ours, theirs):
        assert a.dtype == b.dtype, name
        scale = b.float().abs().max()
        assert scale > 0, name
        torch.testing.assert_close(a.float() / scale, b.float() / scale, **tol, msg=name)


def test_fused_branch_passes_gradcheck_in_float64():
    """The input's, the factors' and the base output's gradients are exact (the rank's: the tests below)."""
    from qlrlora.adapter import _LowRankUpdate

    torch.manual_seed(0)
    result = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    A = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    for k in (0, 3, 6):
        assert torch.autograd.gradcheck(
            lambda *t, k=k: _LowRankUpdate.apply(*t, k, k, None, 1.3, None, 0), (result, x, A, B)
        ), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_branch_matches_plain_autograd(dtype):
    """While the window reaches r_max, every gradient, the rank's included, is the reference's."""
    torch.manual_seed(0)
    layer = adapter_only(r_max=10, rank=5.4, temperature=0.7, dtype=dtype)
    assert layer.ranks.window(layer.index)[1] == 10
    x = torch.randn(4, 9, 40, requires_grad=True)
    upstream = torch.randn(4, 9, 24)
    ours, our_grads = branch_grads(layer, x, upstream, ours=True)
    theirs, their_grads = branch_grads(layer, x, upstream, ours=False)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(ours.float(), theirs, **tol)
    assert_grads_close(our_grads, their_grads, tol)


def test_components_past_the_window_are_not_computed():
    """A rank far below r_max computes k + WINDOW components; the rank's gradient stays within 1e-4 of the one
    over all r_max components, and the other gradients are exact."""
    from qlrlora.adapter import WINDOW

    torch.manual_seed(0)
    layer = adapter_only(r_max=64, rank=10.3, temperature=1.0)
    assert 10 + WINDOW < 64
    k, kk, slope = layer.ranks.window(layer.index)
    assert (k, kk) == (10, 10 + int(WINDOW)) and slope.shape == (kk,)
    x = torch.randn(4, 9, 40, requires_grad=True)
    upstream = torch.randn(4, 9, 24)
    ours, our_grads = branch_grads(layer, x, upstream, ours=True)
    theirs, their_grads = branch_grads(layer, x, upstream, ours=False)
    tight = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(ours, theirs, **tight)
    assert_grads_close(our_grads[:3], their_grads[:3], tight)
    torch.testing.assert_close(our_grads[3], their_grads[3], rtol=1e-4, atol=0)
    with torch.no_grad():  # what lies past the window never enters the arithmetic
        layer.lora_A[kk:] = float("nan")
        layer.lora_B[:, kk:] = float("nan")
    _, (dx, dA, dB, drank) = branch_grads(layer, x, upstream, ours=True)
    assert bool(torch.isfinite(dx).all()) and bool(torch.isfinite(drank).all())
    assert bool(torch.isfinite(dA[:kk]).all()) and bool(torch.isfinite(dB[:, :kk]).all())
    assert bool((dA[k:] == 0).all()) and bool((dB[:, k:] == 0).all())  # components past the rank do not train


def test_frozen_or_gradient_free_forward_computes_only_the_hard_rank():
    torch.manual_seed(0)
    layer = adapter_only(r_max=16, rank=6.2, temperature=1.0)
    assert layer.ranks.window(layer.index)[:2] == (6, 16)
    with torch.no_grad():
        assert layer.ranks.window(layer.index) == (6, 6, None)
    layer.ranks.learning = False
    assert layer.ranks.window(layer.index) == (6, 6, None)
    with torch.no_grad():
        layer.lora_A[6:] = float("nan")
        layer.lora_B[:, 6:] = float("nan")
    x = torch.randn(3, 40, requires_grad=True)
    layer(x).sum().backward()
    assert bool(torch.isfinite(x.grad).all()) and layer.ranks.values.grad is None
    assert bool((layer.lora_A.grad[6:] == 0).all()) and bool((layer.lora_B.grad[:, 6:] == 0).all())
    assert bool(torch.isfinite(layer.lora_A.grad).all()) and bool(torch.isfinite(layer.lora_B.grad).all())


def test_hard_ranks_follow_every_write_to_the_rank_vector():
    """The per-layer hard ranks are cached between writes; any in-place write to the vector refreshes them."""
    layer = adapter_only(r_max=16, rank=6.2, temperature=1.0)
    assert layer.ranks.window(layer.index)[0] == 6
    with torch.no_grad():
        layer.ranks.values.add_(3.0)
    assert layer.ranks.window(layer.index)[0] == 9
    with torch.no_grad():
        layer.ranks.values[0] = 2.0
    assert layer.ranks.window(layer.index)[0] == 2
    layer.ranks.snap_()
    assert layer.ranks.window(layer.index)[0] == 2
    layer.ranks.temperature = 0.5
    assert layer.ranks.window(layer.index)[1] == 2 + 8


def test_fused_branch_ignores_autocast_and_computes_in_the_adapter_dtype():
    torch.manual_seed(0)
    layer = trained_layer(nn.Linear(16, 8), r_max=4, init_rank=3, alpha=2.0, dtype=torch.float32)
    x = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == layer.ranks.values.grad.dtype == torch.float32
    torch.testing.assert_close(layer.lora_B.grad, torch.ones(2, 8).t() @ (x @ layer.lora_A.t() * layer.rank_mask() * layer.scaling).detach())


def test_ordering_the_live_components_sorts_them_largest_first_with_their_adam_state_and_keeps_the_output():
    torch.manual_seed(0)
    layer = adapter_only(r_max=16, rank=6.0, temperature=1.0)
    layer.ranks.learning = False
    with torch.no_grad():
        layer.lora_B.mul_(torch.rand(16))  # components of clearly different sizes
    x = torch.randn(3, 5, 40)
    optimizer = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    layer(x).sum().backward()
    optimizer.step()  # a state to permute: each moment now differs from component to component
    state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in (layer.lora_A, layer.lora_B)}
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    before = layer(x).detach()

    layer.order_components_(6, optimizer.state)
    size = layer.lora_B[:, :6].norm(dim=0) * layer.lora_A[:6].norm(dim=1)
    assert bool((size[:-1] >= size[1:]).all()) and not bool((B[:, :6].norm(dim=0) * A[:6].norm(dim=1) == size).all())
    order = [next(j for j in range(6) if torch.equal(layer.lora_A[i], A[j])) for i in range(6)]
    assert sorted(order) == list(range(6))
    torch.testing.assert_close(layer.lora_B[:, :6], B[:, order], rtol=0, atol=0)
    assert torch.equal(layer.lora_A[6:], A[6:]) and torch.equal(layer.lora_B[:, 6:], B[:, 6:])  # switched off: kept
    for name in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(optimizer.state[layer.lora_A][name][:6], state[layer.lora_A][name][order], rtol=0, atol=0)
        torch.testing.assert_close(optimizer.state[layer.lora_B][name][:, :6], state[layer.lora_B][name][:, order], rtol=0, atol=0)
    torch.testing.assert_close(layer(x).detach(), before, rtol=1e-5, atol=1e-5)
    layer.order_components_(1, optimizer.state)  # one component or none: nothing to sort
    torch.testing.assert_close(layer.lora_A[:6], A[order], rtol=0, atol=0)


def test_cutting_the_factors_to_the_frozen_rank_changes_no_output_or_gradient():
    torch.manual_seed(0)
    layer = adapter_only(r_max=16, rank=6.2, temperature=1.0)
    layer.ranks.learning = False
    x = torch.randn(3, 5, 40, requires_grad=True)
    upstream = torch.randn(3, 5, 24)
    before, (dx, dA, dB, _) = branch_grads(layer, x, upstream, ours=True)
    A, B = layer.lora_A, layer.lora_B
    layer.resize_(6)
    assert layer.components == 6 and layer.lora_A is A and layer.lora_B is B  # an optimizer keeps its parameters
    after, (dx_cut, dA_cut, dB_cut, _) = branch_grads(layer, x, upstream, ours=True)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx_cut, dx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dA_cut, dA[:6], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dB_cut, dB[:, :6], rtol=1e-6, atol=1e-6)
    assert layer.delta_weight().shape == (24, 40)

    with torch.no_grad():
        layer.ranks.values[layer.index] = 9.0
    with pytest.raises(RuntimeError, match="hold 6 components and the forward pass needs 9"):
        layer(x)
    layer.resize_(16)  # grown back: the new components start from a fresh A and a zero B, so they add nothing yet
    with torch.no_grad():
        layer.ranks.values[layer.index] = 6.2
    assert layer.components == 16 and bool((layer.lora_B[:, 6:] == 0).all()) and bool(layer.lora_A[6:].abs().sum() > 0)
    with torch.no_grad():
        layer.ranks.values[layer.index] = 16.0
        grown = layer(x)
        layer.ranks.values[layer.index] = 6.0
        torch.testing.assert_close(grown, layer(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="expected 0 <= components <= r_max=16, got 17"):
        layer.resize_(17)


@pytest.mark.parametrize("redraws", [True, False])
def test_fused_dropout_passes_gradcheck_in_float64(redraws, monkeypatch):
    """With dropout inside the node, the backward pass uses the forward's mask, drawn again from its seed (GPU) or
    kept (CPU): the gradients of the input and the factors are exact."""
    from qlrlora import adapter
    from qlrlora.adapter import _LowRankUpdate

    monkeypatch.setattr(adapter, "_redraws", lambda device: redraws)
    torch.manual_seed(0)
    result = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    A = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    for k in (3, 6):
        assert torch.autograd.gradcheck(
            lambda *t, k=k: _LowRankUpdate.apply(*t, k, k, None, 1.3, None, 0, 0.5, 1234), (result, x, A, B)
        ), k


@pytest.mark.parametrize("redraws", [True, False])
def test_fused_dropout_is_the_reference_dropout_with_the_same_mask(redraws, monkeypatch):
    """Forward and every gradient, the rank's included, equal the branch fed by x * mask / (1 - p), written out."""
    from qlrlora import adapter

    monkeypatch.setattr(adapter, "_redraws", lambda device: redraws)
    torch.manual_seed(0)
    layer = adapter_only(r_max=10, rank=5.4, temperature=0.7)
    layer.dropout = 0.3
    x = torch.randn(4, 9, 40, requires_grad=True)
    upstream = torch.randn(4, 9, 24)
    monkeypatch.setattr(adapter, "_dropout_seed", lambda: 99)
    ours, our_grads = branch_grads(layer, x, upstream, ours=True)
    mask = adapter._kept(x.detach().reshape(-1, 40), 0.3, 99).view(x.shape)
    assert mask.dtype == torch.bool and 0.6 < float(mask.float().mean()) < 0.8
    for t in (x, layer.lora_A, layer.lora_B, layer.ranks.values):
        t.grad = None
    theirs = layer.base(x) + reference_delta(layer, x * mask / 0.7)
    (theirs * upstream).sum().backward()
    their_grads = (x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.ranks.values.grad)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(ours, theirs, **tol)
    assert_grads_close(our_grads, their_grads, tol)


def test_dropout_draws_a_fresh_mask_per_call_in_training_and_none_in_eval():
    torch.manual_seed(0)
    layer = adapter_only(r_max=8, rank=8.0, temperature=1.0)
    plain = layer(x := torch.randn(64, 40)).detach()
    layer.dropout = 0.5
    first, second = layer(x), layer(x)
    assert not torch.equal(first, plain) and not torch.equal(first, second)
    layer.eval()
    torch.testing.assert_close(layer(x), plain, rtol=0, atol=0)


@pytest.mark.parametrize("redraws", [True, False])
def test_checkpointing_recomputes_the_same_dropout_masks(redraws, monkeypatch):
    """Gradient checkpointing restores the CPU generator before it recomputes, so the recomputation draws the same
    seeds: the gradients are those of the same forward pass without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    from qlrlora import adapter

    monkeypatch.setattr(adapter, "_redraws", lambda device: redraws)
    torch.manual_seed(0)
    first = trained_layer(nn.Linear(40, 40), r_max=8, alpha=4.0, dtype=torch.float32, dropout=0.3)
    second = trained_layer(nn.Linear(40, 24), r_max=8, alpha=4.0, dtype=torch.float32, dropout=0.3)
    x = torch.randn(6, 40, requires_grad=True)

    def grads(checkpointed: bool):
        for t in (x, first.lora_A, second.lora_A, second.lora_B):
            t.grad = None
        torch.manual_seed(5)

        def block(t):
            return second(torch.relu(first(t)))

        out = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        out.square().sum().backward()
        return [t.grad.clone() for t in (x, first.lora_A, second.lora_A, second.lora_B)]

    for plain, recomputed in zip(grads(False), grads(True)):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("redraws", [True, False])
def test_dropout_keeps_no_copy_of_the_input_for_the_backward_pass(redraws, monkeypatch):
    """The node keeps the input it was given, not a dropped copy: with the mask drawn again, the same storages as
    without dropout; kept, one byte more per entry of the input."""
    from qlrlora import adapter

    monkeypatch.setattr(adapter, "_redraws", lambda device: redraws)

    def saved(p):
        torch.manual_seed(0)
        layer = trained_layer(nn.Linear(40, 24), r_max=8, alpha=4.0, dtype=torch.float32, dropout=p)
        x = torch.randn(6, 40, requires_grad=True)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            layer(x)
        weights = {q.untyped_storage().data_ptr() for q in layer.parameters()}
        return sorted(t.untyped_storage().nbytes() for t in kept if t.untyped_storage().data_ptr() not in weights)

    assert saved(0.3) == sorted(saved(0.0) + ([] if redraws else [6 * 40]))
