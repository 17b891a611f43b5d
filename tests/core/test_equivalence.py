"""The fast expert paths equal the slow per-expert reference (float64), and a case computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import moetune
from moetune.core.architectures import linear_dims
from moetune.core.context import RoutingContext
from moetune.core.experts import LoRAExperts, SortedSlots, WeightedSlotSum
from moetune.core.layers import LoRALinear, MoEFFN, MoELinear
from tests.helpers.models import ROUTERS
from tests.helpers.numerics import assert_paths_agree, float64_model, max_rel_error, randomize_, run
from tests.helpers.tiny_models import tiny_batch, tiny_model

CASES = [
    ("llama", "ffn"),
    ("llama", "linear"),
    ("gpt2", "ffn"),
    ("gpt2", "linear"),
    ("phi3", "ffn"),
    ("bert", "linear"),
]


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("family,expert_type", CASES)
def test_fast_equals_reference(family: str, expert_type: str, router: str) -> None:
    model = float64_model(family, expert_type, router)
    randomize_(model, tie=router in ("topk", "topp"))
    batch = tiny_batch(family, batch=3, seq=9, padded=True)
    assert_paths_agree(model, batch)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("family,expert_type", [("llama", "ffn"), ("gpt2", "linear")])
def test_fast_equals_reference_with_two_task_blocks(family: str, expert_type: str, router: str) -> None:
    """Two task blocks and a shared expert (stored after task A's experts in block 0): routing among
    all experts, restricted to either task, and per-sample tasks in one batch."""
    model = float64_model(family, expert_type, router, num_experts=3, num_shared_experts=1, task="A")
    model.add_experts(2, task="B", freeze_existing=False)
    randomize_(model, tie=router in ("topk", "topp"))
    batch = tiny_batch(family, batch=3, seq=9, padded=True)
    assert_paths_agree(model, batch)
    for tasks in (["A"], ["B"]):
        with model.use_tasks(tasks):
            assert_paths_agree(model, batch)
    assert_paths_agree(model, batch | {"task_ids": torch.tensor([1, 0, 1])})


@pytest.mark.parametrize("router", ["topk", "soft", "switch"])
def test_grouped_path_with_two_task_blocks(router: str) -> None:
    pytest.importorskip("torch", minversion="2.8")
    cfg = moetune.MoEConfig(
        router=router, num_experts=4, r=4, lora_dropout=0.0, capacity_factor=0.5, num_shared_experts=1
    )
    model = moetune.get_moe_model(tiny_model("llama"), cfg)
    model.add_experts(3, task="B", freeze_existing=False)
    randomize_(model)
    model.train()
    model._ctx.options.dispatch = "grouped"
    batch = tiny_batch("llama", batch=3, seq=9, padded=True)
    for extra in ({}, {"task_ids": torch.tensor([0, 1, 1])}):
        out, grads = run(model, batch | extra, reference=False)
        ref_out, ref_grads = run(model, batch | extra, reference=True)
        assert any(name.endswith("lora_B.1") for name in ref_grads) and grads.keys() == ref_grads.keys()
        assert max_rel_error({"logits": out, **grads}, {"logits": ref_out, **ref_grads}) < 1e-4
    with model.use_tasks("B"):
        out, grads = run(model, batch, reference=False)
        ref_out, ref_grads = run(model, batch, reference=True)
    assert max_rel_error({"logits": out, **grads}, {"logits": ref_out, **ref_grads}) < 1e-4


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_grouped_path_equals_reference(family: str, router: str) -> None:
    """The sorted grouped-GEMM `ffn` path (float32 only: torch's grouped GEMM has no float64)."""
    pytest.importorskip("torch", minversion="2.8")
    base = tiny_model(family)
    cfg = moetune.MoEConfig(
        router=router,
        num_experts=4,
        r=4,  # grouped GEMM rows must be 16-byte multiples
        lora_dropout=0.0,
        capacity_factor=0.5,
        num_shared_experts=1 if router == "topk" else 0,
        importance_loss_coef=0.1,
    )
    model = moetune.get_moe_model(base, cfg)
    randomize_(model, tie=router in ("topk", "topp"))
    model.train()
    assert next(layer for _, layer in model.moe_layers()).uses_grouped()
    batch = tiny_batch(family, batch=3, seq=9, padded=True)
    results = {}
    for dispatch in ("grouped", "dense"):
        model._ctx.options.dispatch = dispatch
        out, grads = run(model, batch, reference=False)
        results[dispatch] = {"logits": out, **grads}
    out, grads = run(model, batch, reference=True)
    reference = {"logits": out, **grads}
    assert any("lora_B" in name for name in reference)
    assert results["grouped"].keys() == reference.keys()
    assert max_rel_error(results["grouped"], reference) < 1e-4
    assert max_rel_error(results["dense"], reference) < 1e-4


@pytest.mark.parametrize("targets", [["down_proj"], ["up_proj"], ["gate_proj", "down_proj"]])
def test_grouped_path_with_some_projections(targets: list[str]) -> None:
    base = tiny_model("llama")
    cfg = moetune.MoEConfig(num_experts=4, r=4, lora_dropout=0.0, target_modules=targets)
    model = moetune.get_moe_model(base, cfg)
    randomize_(model)
    model.train()
    model._ctx.options.dispatch = "grouped"
    batch = tiny_batch("llama", batch=2, seq=7, padded=True)
    out, grads = run(model, batch, reference=False)
    ref_out, ref_grads = run(model, batch, reference=True)
    assert max_rel_error({"logits": out, **grads}, {"logits": ref_out, **ref_grads}) < 1e-4


def test_auto_dispatch_follows_the_dense_paths_waste() -> None:
    """`auto` picks the grouped path once E r (1/d_in + 1/d_out) > 0.25, never for float64 or rows that
    are not 16-byte multiples; CPU inference (eval, no autograd) always takes the sorted path."""
    chosen, inference = {}, {}
    for E, r, dtype in [
        (1, 4, torch.float32),
        (2, 4, torch.float32),
        (8, 4, torch.float32),
        (8, 4, torch.float64),
        (8, 3, torch.float32),
    ]:
        base = tiny_model("llama", dtype=dtype)  # hidden 32, intermediate 64
        model = moetune.get_moe_model(base, moetune.MoEConfig(num_experts=E, r=r, top_k=1))
        layer = next(layer for _, layer in model.moe_layers())
        chosen[E, r, dtype] = layer.uses_grouped()
        assert layer.slot_path() == ("grouped" if chosen[E, r, dtype] else "dense")  # training mode
        model.eval()
        with torch.no_grad():
            inference[E, r, dtype] = layer.slot_path()
        assert layer.slot_path() == ("grouped" if chosen[E, r, dtype] else "dense")  # autograd on
    # 1*4*(1/32 + 1/64) = 0.19 -> dense; 2*4*(1/32 + 1/64) = 0.375, 8*4*(1/32 + 1/64) = 1.5 -> grouped
    assert chosen == {
        (1, 4, torch.float32): False,
        (2, 4, torch.float32): True,
        (8, 4, torch.float32): True,
        (8, 4, torch.float64): False,
        (8, 3, torch.float32): False,
    }
    assert inference == {
        (1, 4, torch.float32): "sorted",
        (2, 4, torch.float32): "sorted",
        (8, 4, torch.float32): "sorted",
        (8, 4, torch.float64): "sorted",
        (8, 3, torch.float32): "sorted",
    }


@pytest.mark.parametrize("router", ["topk", "switch"])
@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_fast_equals_reference_without_autograd(family: str, router: str) -> None:
    """Under no_grad the slot tensors are combined in place; the result must not change. In eval mode
    on CPU, no_grad also picks the sorted path by itself; it equals the reference too."""
    model = float64_model(family, "ffn", router)
    randomize_(model)
    model.eval()
    batch = tiny_batch(family, batch=3, seq=9, padded=True)
    layer = next(layer for _, layer in model.moe_layers())
    with torch.no_grad():
        assert layer.slot_path() == "sorted"
        with model.reference_path():
            ref = model(**batch).logits
    for dispatch in ("auto", "dense", "sorted"):
        model._ctx.options.dispatch = dispatch
        with torch.no_grad():
            fast = model(**batch).logits
        with torch.enable_grad():
            with_grad = model(**batch).logits.detach()
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
        if dispatch != "auto":  # auto: dense with autograd, sorted without
            assert torch.equal(fast, with_grad)


def test_switch_overflow_really_happens() -> None:
    """The switch case above drops tokens: some real tokens keep only the base output."""
    base = tiny_model("llama", dtype=torch.float64)
    model = moetune.get_moe_model(
        base, moetune.MoEConfig(router="switch", num_experts=4, capacity_factor=0.5, router_dtype="float64")
    )
    randomize_(model)
    model(**tiny_batch("llama", batch=3, seq=9))
    stats = next(iter(model.routing_stats().values()))
    real = stats["tokens"]
    assert sum(stats["tokens_per_expert"]) < real  # overflow tokens hold no slot
    assert max(stats["tokens_per_expert"]) <= math.ceil(0.5 * real / 4)


def test_ties_are_exercised() -> None:
    """With identical router rows, experts 0 and 1 have equal probabilities on every token."""
    base = tiny_model("llama", dtype=torch.float64)
    model = moetune.get_moe_model(base, moetune.MoEConfig(router_dtype="float64", num_experts=4))
    randomize_(model, tie=True)
    layer = next(layer for _, layer in model.moe_layers())
    x = torch.randn(5, 32, dtype=torch.float64)
    routing = layer.router(x, torch.ones(5, dtype=torch.bool))
    assert torch.equal(routing.probs[:, 0], routing.probs[:, 1])


# ---- a case computed by hand ---------------------------------------------------------------------
def _linear(weight: list[list[float]]) -> nn.Linear:
    w = torch.tensor(weight, dtype=torch.float64)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64)
    layer.weight.data = w
    return layer


def _hand_layer(layer: MoELinear | MoEFFN, router_rows: list[list[float]]) -> None:
    layer.router.weight_blocks[0].data = torch.tensor(router_rows, dtype=torch.float64)


CFG = dict(num_experts=3, top_k=2, r=1, lora_alpha=2, lora_dropout=0.0, router_dtype="float64")
# Router logits for x = (1, 0, 0, 0) are (2, 1, 0): experts 0 and 1 are chosen with weights
# g0 = e^2 / (e^2 + e) = e / (e + 1) and g1 = 1 / (e + 1).
ROUTER = [[2.0, 0, 0, 0], [1.0, 0, 0, 0], [0.0, 0, 0, 0]]
X = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
G0, G1 = math.e / (math.e + 1), 1 / (math.e + 1)


def test_linear_layer_by_hand() -> None:
    cfg = moetune.MoEConfig(expert_type="linear", **CFG)
    W = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
    layer = MoELinear(_linear(W), cfg, 3, RoutingContext(), "hand")
    _hand_layer(layer, ROUTER)
    # expert 0: A = (1,0,0,0), B = (1,2,3,4)^T -> delta0 = s * 1 * (1,2,3,4), s = alpha / r = 2
    # expert 1: A = (2,0,0,0), B = (0,1,0,1)^T -> delta1 = s * 2 * (0,1,0,1)
    # expert 2: large, but never chosen
    layer.experts.lora_A[0].data = torch.tensor(
        [[[1.0, 0, 0, 0]], [[2.0, 0, 0, 0]], [[9.0, 9, 9, 9]]], dtype=torch.float64
    )
    layer.experts.lora_B[0].data = torch.tensor(
        [[[1.0], [2], [3], [4]], [[0.0], [1], [0], [1]], [[9.0], [9], [9], [9]]], dtype=torch.float64
    )
    expected = [1 + 2 * G0 * 1, 2 * G0 * 2 + 2 * G1 * 2, 2 * G0 * 3, 2 * G0 * 4 + 2 * G1 * 2]
    for reference in (False, True):
        layer.ctx.options.reference = reference
        y = layer(X)
        assert y[0].tolist() == pytest.approx(expected, abs=1e-12)


class IdentityGatedMLP(nn.Module):
    """down(act(gate x) * up x) with act = identity, small enough to work out by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = _linear([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
        self.up_proj = _linear([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
        self.down_proj = _linear([[1.0, 0], [0, 1.0], [1.0, 1.0], [0, 0]])
        self.act_fn = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_ffn_layer_by_hand() -> None:
    cfg = moetune.MoEConfig(expert_type="ffn", target_modules=["gate_proj"], **CFG)
    mlp = IdentityGatedMLP()
    spec = moetune.core.architectures.find_ffn_spec(mlp)
    layer = MoEFFN(mlp, spec, ["gate_proj"], cfg, 3, RoutingContext(), "hand")
    _hand_layer(layer, ROUTER)
    # Base: gate x = (1, 0), up x = (1, 1), h0 = (1, 0), FFN(x) = down h0 = (1, 0, 1, 0).
    # Expert e adds s * B_e (A_e x) to gate x. Expert 0: A=(1,0,0,0), B=(0,1)^T -> gate = (1, 2) ->
    # h = (1, 2) -> FFN_0 = (1, 2, 3, 0). Expert 1: A=(3,0,0,0), B=(1,0)^T -> gate = (7, 0) -> h = (7, 0)
    # -> FFN_1 = (7, 0, 7, 0). Output = FFN + g0 (FFN_0 - FFN) + g1 (FFN_1 - FFN).
    bank = layer.experts["gate_proj"]
    bank.lora_A[0].data = torch.tensor(
        [[[1.0, 0, 0, 0]], [[3.0, 0, 0, 0]], [[5.0, 5, 5, 5]]], dtype=torch.float64
    )
    bank.lora_B[0].data = torch.tensor([[[0.0], [1]], [[1.0], [0]], [[5.0], [5]]], dtype=torch.float64)
    ffn, ffn0, ffn1 = [1, 0, 1, 0], [1, 2, 3, 0], [7, 0, 7, 0]
    expected = [f + G0 * (a - f) + G1 * (b - f) for f, a, b in zip(ffn, ffn0, ffn1, strict=True)]
    for reference in (False, True):
        layer.ctx.options.reference = reference
        assert layer(X)[0].tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("with_init", [False, True])
def test_weighted_slot_sum_by_hand_and_against_autograd(with_init: bool) -> None:
    """init + sum_k w_kt h_kt and its hand-written backward: by hand on one token, then the value and the
    gradients of h, w and init against autograd of the obvious formula, in float64."""
    h = torch.tensor([[[1.0, 2.0]], [[10.0, 20.0]]], dtype=torch.float64)  # K=2, T=1, F=2
    w = torch.tensor([[0.25], [0.75]], dtype=torch.float64)
    init = torch.tensor([[100.0, 200.0]], dtype=torch.float64) if with_init else None
    expected = [0.25 * 1 + 0.75 * 10, 0.25 * 2 + 0.75 * 20]
    if with_init:
        expected = [100 + expected[0], 200 + expected[1]]
    assert WeightedSlotSum.apply(h, w, init).tolist() == [expected]

    gen = torch.Generator().manual_seed(0)
    K, T, F = 3, 7, 5
    h_KTF = torch.randn(K, T, F, dtype=torch.float64, generator=gen)
    w_KT = torch.rand(K, T, dtype=torch.float64, generator=gen)
    init_TF = torch.randn(T, F, dtype=torch.float64, generator=gen) if with_init else None
    grad_TF = torch.randn(T, F, dtype=torch.float64, generator=gen)

    def run(fast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [t.clone().requires_grad_() for t in (h_KTF, w_KT) + ((init_TF,) if with_init else ())]
        hh, ww = leaves[:2]
        ii = leaves[2] * 1 if with_init else None  # non-leaf: the fast path updates it in place
        if fast:
            out = WeightedSlotSum.apply(hh, ww, ii)
        else:
            out = (hh * ww[..., None]).sum(0) + (ii if with_init else 0)
        out.backward(grad_TF)
        return out.detach(), [t.grad for t in leaves]

    (fast, fast_grads), (ref, ref_grads) = run(True), run(False)
    torch.testing.assert_close(fast, ref, rtol=1e-14, atol=1e-14)
    for got, want in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    # finite differences on h and w
    assert torch.autograd.gradcheck(
        lambda a, b: WeightedSlotSum.apply(a, b, None),
        (h_KTF.clone().requires_grad_(), w_KT.clone().requires_grad_()),
    )


def test_silu_glu_equals_autograd_of_the_two_ops() -> None:
    """SiluGLU keeps only gate and up and recomputes silu in backward: value and gradients equal to
    autograd of silu(gate) * up (same formulas, float64), also with `up` broadcast from (T, F)."""
    from moetune.core.kernels import SiluGLU

    gen = torch.Generator().manual_seed(0)
    gate = torch.randn(2, 5, 3, dtype=torch.float64, generator=gen)
    up_TF = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    grad = torch.randn(2, 5, 3, dtype=torch.float64, generator=gen)
    for up in (torch.randn(2, 5, 3, dtype=torch.float64, generator=gen), up_TF):
        results = []
        for fused in (True, False):
            g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
            u_in = u.expand(2, 5, 3)  # a broadcast slot tensor, as `SlotsKT.broadcast` gives
            h = SiluGLU.apply(g, u_in) if fused else torch.nn.functional.silu(g) * u_in
            h.backward(grad)
            results.append((h.detach(), g.grad, u.grad))
        for fused, plain in zip(*results, strict=True):
            torch.testing.assert_close(fused, plain, rtol=0, atol=1e-15)
    sig = torch.sigmoid(gate[0, 0, 0])  # by hand: d silu(x)/dx = sig(x) (1 + x (1 - sig(x)))
    g = gate.clone().requires_grad_()
    SiluGLU.apply(g, torch.ones_like(gate)).sum().backward()
    assert g.grad[0, 0, 0].item() == pytest.approx((sig * (1 + gate[0, 0, 0] * (1 - sig))).item(), rel=1e-12)
    assert torch.autograd.gradcheck(
        SiluGLU.apply, (gate.clone().requires_grad_(), up_TF.expand(2, 5, 3).clone().requires_grad_())
    )


def test_silu_glu_writes_its_gradients_over_inputs_it_owns() -> None:
    """SiluGLU(owns_inputs=True): the same value and gradients as autograd of the two ops; a backward
    that frees the graph writes the gradients over gate and up (no fresh tensors), one under
    retain_graph leaves them intact, so a second backward gets the same gradients."""
    from moetune.core.kernels import SiluGLU

    gen = torch.Generator().manual_seed(1)
    gate0, up0, grad = (torch.randn(2, 5, 3, dtype=torch.float64, generator=gen) for _ in range(3))
    x = torch.randn(2, 5, 3, dtype=torch.float64, generator=gen)
    x_plain = x.clone().requires_grad_()
    (torch.nn.functional.silu(gate0 + x_plain) * (up0 * x_plain)).backward(grad)

    def run(retain: bool) -> tuple[torch.Tensor, ...]:
        x_in = x.clone().requires_grad_()
        gate, up = gate0 + x_in, up0 * x_in  # fresh tensors that only SiluGLU reads
        h = SiluGLU.apply(gate, up, True)
        torch.testing.assert_close(h, torch.nn.functional.silu(gate0 + x) * (up0 * x), rtol=0, atol=0)
        h.backward(grad, retain_graph=retain)
        return x_in, gate.detach().clone(), up.detach().clone(), h

    x_in, gate_after, up_after, _ = run(retain=False)
    torch.testing.assert_close(x_in.grad, x_plain.grad, rtol=0, atol=1e-15)
    # the gradients live where gate and up were: d/d gate = grad up silu'(gate), d/d up = grad silu(gate)
    sig = torch.sigmoid(gate0 + x)
    torch.testing.assert_close(gate_after, grad * torch.nn.functional.silu(gate0 + x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(
        up_after, grad * (up0 * x) * sig * (1 + (gate0 + x) * (1 - sig)), rtol=1e-14, atol=1e-14
    )

    x_in, gate_after, up_after, h = run(retain=True)
    torch.testing.assert_close(gate_after, gate0 + x, rtol=0, atol=0)  # untouched
    torch.testing.assert_close(up_after, up0 * x, rtol=0, atol=0)
    h.backward(grad)  # the second backward through the kept graph
    torch.testing.assert_close(x_in.grad, 2 * x_plain.grad, rtol=0, atol=1e-14)
    # double backward (create_graph keeps the graph): finite differences of the gradient
    assert torch.autograd.gradgradcheck(
        lambda g, u: SiluGLU.apply(g * 1, u * 1, True),
        (gate0.clone().requires_grad_(), up0.clone().requires_grad_()),
    )


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_init", [False, True])
def test_mix_and_project_equals_the_separate_ops(with_mask: bool, with_init: bool) -> None:
    """MixAndProjectA = (init + sum_k w_k h_k, (h ⊙ mask) A^T): values and gradients (h, w, init, A)
    equal to autograd of the separate ops (float64), finite differences, create_graph; a backward
    that frees the graph hands h the saved h ⊙ mask's memory as its gradient, retain_graph does not."""
    from moetune.core.experts import MixAndProjectA

    gen = torch.Generator().manual_seed(2)
    K, T, F, M = 2, 5, 6, 4
    x0, w0 = torch.randn(K, T, F, dtype=torch.float64, generator=gen), torch.rand(K, T, dtype=torch.float64)
    A0, init0 = torch.randn(M, F, dtype=torch.float64, generator=gen), torch.randn(T, F, dtype=torch.float64)
    mask = (torch.rand(T, F, generator=gen) > 0.3).double() / 0.7 if with_mask else None
    g_mixed, g_hA = torch.randn(T, F, dtype=torch.float64), torch.randn(K, T, M, dtype=torch.float64)

    def leaves() -> list[torch.Tensor]:
        return [t.clone().requires_grad_() for t in (x0, w0, A0, init0)]

    def separate(x, w, A, init):  # noqa: ANN001, ANN202
        h = x * 2  # a fresh tensor, as the slots' hidden is
        hd = h if mask is None else h * mask
        mixed = (init if with_init else 0) + (w[..., None] * h).sum(0)
        return mixed, hd @ A.T

    def fused(x, w, A, init):  # noqa: ANN001, ANN202
        return MixAndProjectA.apply(x * 2, w, init * 1 if with_init else None, mask, A)

    want = leaves()
    outs = separate(*want)
    torch.autograd.backward(outs, (g_mixed, g_hA))
    names = ["x", "w", "A", "init"][: 4 if with_init else 3]

    def run_fused(retain: bool) -> tuple[list[torch.Tensor], bool]:
        """The leaves with their gradients, and whether h's gradient took a saved tensor's memory."""
        got, saved, h_grad = leaves(), [], []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fused_outs = fused(*got)
        for a, b in zip(fused_outs, outs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
        fused_outs[1].grad_fn.register_hook(lambda grads_in, _: h_grad.append(grads_in[0]))
        torch.autograd.backward(fused_outs, (g_mixed, g_hA), retain_graph=retain)
        if retain:  # a second backward through the kept graph
            torch.autograd.backward(fused_outs, (g_mixed, g_hA))
        return got, any(h_grad[0].data_ptr() == t.data_ptr() for t in saved if t is not None)

    got, reused = run_fused(retain=False)
    for name, a, b in zip(names, got, want, strict=False):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-13, atol=1e-13, msg=name)
    assert reused == with_mask  # the saved h ⊙ mask (fresh) becomes h's gradient
    got, reused = run_fused(retain=True)
    for name, a, b in zip(names, got, want, strict=False):
        torch.testing.assert_close(a.grad, 2 * b.grad, rtol=1e-13, atol=1e-13, msg=name)
    assert not reused

    args = [t.clone().requires_grad_() for t in (x0, w0, A0)]
    assert torch.autograd.gradcheck(lambda x, w, A: fused(x, w, A, init0), args)
    assert torch.autograd.gradgradcheck(lambda x, w, A: fused(x, w, A, init0), args)


@pytest.mark.parametrize("base_dtype", [torch.float64, torch.bfloat16])
def test_attention_lora_by_hand_with_and_without_autograd(base_dtype: torch.dtype) -> None:
    """LoRALinear = W x + b + s B A x. Without autograd B's GEMM adds into the frozen output in place
    (adapter and base dtypes equal); otherwise, and with autograd, a delta tensor is added."""
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(6, 5).to(base_dtype)
    layer = LoRALinear(base, r=3, scaling=0.5, dropout=0.0, ctx=RoutingContext(), adapter_dtype="float64")
    A, B = layer.lora.expert_weights(0)  # views: (3, 6), (5, 3)
    with torch.no_grad():
        A.copy_(torch.randn(3, 6, generator=gen, dtype=torch.float64))
        B.copy_(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    x = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64).to(base_dtype)
    with torch.no_grad():
        by_hand = base(x).double() + 0.5 * (x.double() @ A.T @ B.T)
    with torch.no_grad():
        y_inference = layer(x)
    y_autograd = layer(x)
    tol = 1e-12 if base_dtype == torch.float64 else 2e-2
    torch.testing.assert_close(y_inference.double(), by_hand, rtol=tol, atol=tol)
    torch.testing.assert_close(y_autograd.detach(), y_inference, rtol=1e-12, atol=1e-12)
    assert y_autograd.requires_grad and y_inference.dtype == base_dtype


def test_ffn_decomposition_matches_each_family_forward() -> None:
    """FFNSpec's post(out(hidden(in(x)))) is each family's own MLP forward."""
    from moetune.core.architectures import find_ffn_spec

    for family in ["llama", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "qwen2", "mistral"]:
        base = tiny_model(family, dtype=torch.float64)
        mlps = [m for m in base.modules() if find_ffn_spec(m) is not None]
        assert mlps, family
        mlp, spec = mlps[0], find_ffn_spec(mlps[0])
        layer = MoEFFN(mlp, spec, [], moetune.MoEConfig(), 2, RoutingContext(), "x")
        x = torch.randn(2, 5, 32, dtype=torch.float64)
        x_TD = x.reshape(-1, 32)
        ours = layer._post(layer._expert_ffn(None, x_TD, x_TD)).view(2, 5, -1)
        torch.testing.assert_close(ours, mlp(x), rtol=0, atol=1e-12, msg=family)


def _two_task_inference_model(
    family: str, dispatch: str, num_shared: int = 1
) -> tuple[moetune.MoEModel, dict, MoEFFN]:
    """A random model in eval mode with task blocks A (4 experts) and B (2 more), `dispatch` forced,
    a padded batch of 3 x 9 tokens, and its first `ffn` layer (for the tests of CPU inference)."""
    cfg = moetune.MoEConfig(num_experts=4, r=4, lora_dropout=0.0, num_shared_experts=num_shared)
    model = moetune.get_moe_model(tiny_model(family), cfg)
    model.add_experts(2, task="B", freeze_existing=False)
    randomize_(model)
    model.eval()
    model._ctx.options.dispatch = dispatch
    layer = next(layer for _, layer in model.moe_layers())
    return model, tiny_batch(family, batch=3, seq=9, padded=True), layer


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cpu_inference_in_token_blocks_equals_one_block(family: str, dispatch: str) -> None:
    """Without autograd on CPU, `ffn` layers run in blocks of `cpu_inference_block` tokens (T = 27 here,
    blocks of 5: the last one short). Padding, two task blocks and a per-sample task mix included; the
    result is the single-block forward's and the reference path's; with autograd on nothing is split."""
    model, batch, layer = _two_task_inference_model(family, dispatch)
    calls = []

    def count_fast(*args, **kwargs):
        calls.append(args[0].shape[0])
        return type(layer)._fast(layer, *args, **kwargs)

    layer._fast = count_fast  # the test observes the blocks; the library never patches a forward
    for extra in ({}, {"task_ids": torch.tensor([0, 1, 1])}):
        results = {}
        for block in (0, 5):
            model._ctx.options.cpu_inference_block = block
            calls.clear()
            with torch.no_grad():
                results[block] = model(**batch | extra).logits
            if not extra:
                assert calls == ([27] if block == 0 else [5, 5, 5, 5, 5, 2])
            else:  # one group per task: 9 tokens of task 0, 18 of task B
                assert sorted(calls) == sorted([9, 18] if block == 0 else [5, 4, 5, 5, 5, 3])
        with torch.no_grad(), model.reference_path():
            reference = model(**batch | extra).logits
        assert max_rel_error({"y": results[5]}, {"y": results[0]}) < 1e-6
        assert max_rel_error({"y": results[5]}, {"y": reference}) < 1e-5
    calls.clear()
    model(**batch).logits.sum().backward()  # autograd on: one block
    assert calls == [27]


def test_sorted_slots_in_pieces_of_whole_experts() -> None:
    """`SortedSlots.pieces`: consecutive rows, whole experts, at most `max_rows` rows unless one expert
    has more (then alone), tokens / weights / x A the whole's rows; one piece is the slots themselves."""
    gen = torch.Generator().manual_seed(0)
    T, K, N, r, D = 40, 2, 6, 3, 5
    idx_TK = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(T)])
    idx_TK[:30, 0] = 2  # expert 2 gets 30 slots: more than max_rows
    w_TK = torch.rand(T, K, generator=gen)
    bank = LoRAExperts(N, D, 7, r, 1.0)
    slots = SortedSlots({"up": bank}, torch.randn(T, D, generator=gen), idx_TK, w_TK, N)
    pieces = slots.pieces(max_rows=20)
    assert len(pieces) > 2
    rows = 0
    for piece in pieces:
        n = piece.token.shape[0]
        assert n <= 20 or len(piece.spans) == 1
        assert piece.spans[0][1] == 0 and piece.spans[-1][2] == n
        assert torch.equal(piece.token, slots.token[rows : rows + n])
        assert torch.equal(piece.w_S1, slots.w_S1[rows : rows + n])
        assert torch.equal(piece.xA["up"], slots.xA["up"][rows : rows + n])
        rows += n
    assert rows == T * K
    assert [j for piece in pieces for j, _, _ in piece.spans] == [j for j, _, _ in slots.spans]
    assert max(piece.token.shape[0] for piece in pieces) >= 30  # expert 2's piece
    assert slots.pieces(max_rows=T * K) == [slots]


@pytest.mark.parametrize("num_shared", [0, 1])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sorted_inference_in_pieces_equals_one_piece(family: str, num_shared: int) -> None:
    """Without autograd on CPU the sorted path runs its slots in pieces of whole experts (blocks of 3
    tokens here: many pieces); padding and two task blocks included, with a shared expert (the mix
    starts from the h0 term) and without (it starts from zeros), the result is the one-piece forward's
    and the reference path's."""
    model, batch, layer = _two_task_inference_model(family, "sorted", num_shared)
    pieces = []

    def count_pieces(*args, **kwargs):
        result = type(layer)._slot_pieces(layer, *args, **kwargs)
        pieces.append(len(result))
        return result

    layer._slot_pieces = count_pieces  # the test observes the pieces; the library never patches them
    for extra in ({}, {"task_ids": torch.tensor([0, 1, 1])}):
        results = {}
        for block in (0, 3):
            model._ctx.options.cpu_inference_block = block
            pieces.clear()
            with torch.no_grad():
                results[block] = model(**batch | extra).logits
            assert max(pieces) == 1 if block == 0 else min(pieces) > 1
        with torch.no_grad(), model.reference_path():
            reference = model(**batch | extra).logits
        assert max_rel_error({"y": results[3]}, {"y": results[0]}) < 1e-6
        assert max_rel_error({"y": results[3]}, {"y": reference}) < 1e-5


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_sorted_path_equals_reference(family: str, router: str) -> None:
    """The sorted path (slots in expert order, one GEMM per expert), forced with autograd on: output and
    every gradient equal the reference in float64; also restricted to a task and with a per-sample mix."""
    model = float64_model(family, "ffn", router, num_experts=3, task="A")
    model.add_experts(2, task="B", freeze_existing=False)
    randomize_(model, tie=router in ("topk", "topp"))
    model._ctx.options.dispatch = "sorted"
    batch = tiny_batch(family, batch=3, seq=9, padded=True)
    assert next(layer for _, layer in model.moe_layers()).slot_path() == "sorted"
    assert_paths_agree(model, batch)
    with model.use_tasks(["B"]):
        assert_paths_agree(model, batch)
    assert_paths_agree(model, batch | {"task_ids": torch.tensor([1, 0, 1])})


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_sorted_path_with_many_experts(family: str) -> None:
    """More than 4 K experts: the sorted path computes x A with one GEMM per expert instead of one
    over all of them; still the reference, gradients included."""
    model = float64_model(family, "ffn", "topk", num_experts=9, num_shared_experts=0)  # 9 > 4 * 2
    randomize_(model)
    model._ctx.options.dispatch = "sorted"
    assert_paths_agree(model, tiny_batch(family, batch=3, seq=9, padded=True))


@pytest.mark.parametrize("targets", [["down_proj"], ["up_proj"], ["gate_proj", "down_proj"]])
def test_sorted_path_with_some_projections(targets: list[str]) -> None:
    model = float64_model("llama", "ffn", "topk", target_modules=targets)
    randomize_(model)
    model._ctx.options.dispatch = "sorted"
    assert_paths_agree(model, tiny_batch("llama", batch=2, seq=7, padded=True))


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_sorted_path_with_lora_dropout_equals_dense(family: str) -> None:
    """In training mode with LoRA dropout, the sorted and dense paths draw the same masks (one per
    token for x, one per token for the hidden, shared by its slots): same output and gradients. (The
    dense path mixes and projects the hidden in one node, `MixAndProjectA`; the sorted one does not.)"""
    model = float64_model(family, "ffn", "topk", lora_dropout=0.3)
    randomize_(model)
    model.train()
    batch = tiny_batch(family, batch=3, seq=9, padded=True)
    results = {}
    for dispatch in ("dense", "sorted"):
        model._ctx.options.dispatch = dispatch
        torch.manual_seed(0)
        out, grads = run(model, batch, reference=False)
        results[dispatch] = {"logits": out, **grads}
    assert max_rel_error(results["sorted"], results["dense"]) < 1e-12
    model._ctx.options.dispatch = "dense"
    torch.manual_seed(1)
    other, _ = run(model, batch, reference=False)
    assert not torch.allclose(other, results["dense"]["logits"])  # the masks do change the output


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_hidden_dropout_mask(family: str) -> None:
    """Training-mode LoRA dropout's mask for the hidden (T, F): every value 0 or 1 / (1 - p), about p
    of them 0 (overall and per row and column), the same mask for the same seed and a fresh one per
    draw, in the dtype asked for; none in eval mode.
    (The K slots of a token share its row: `test_sorted_path_with_lora_dropout_equals_dense`.)"""
    model = float64_model(family, "ffn", "topk", lora_dropout=0.3)
    layer = next(m for m in model.modules() if isinstance(m, MoEFFN))
    layer.train()
    d_model, F = linear_dims(getattr(layer.base_layer, layer.spec.out_proj))[::-1]
    x_TD = torch.randn(64, d_model, dtype=torch.float64)
    torch.manual_seed(0)
    mask_TF = layer._hidden_dropout_mask(x_TD, x_TD.dtype)
    assert mask_TF.shape == (64, F) and mask_TF.dtype == torch.float64
    kept = mask_TF != 0
    assert torch.allclose(mask_TF[kept], torch.full_like(mask_TF[kept], 1 / 0.7))
    assert abs((~kept).double().mean().item() - 0.3) < 6 * (0.3 * 0.7 / mask_TF.numel()) ** 0.5  # 6 sd
    torch.manual_seed(0)
    assert torch.equal(mask_TF, layer._hidden_dropout_mask(x_TD, x_TD.dtype))
    assert not torch.equal(mask_TF, layer._hidden_dropout_mask(x_TD, x_TD.dtype))
    big_TF = layer._hidden_dropout_mask(torch.randn(4096, d_model, dtype=torch.float64), torch.float64)
    dropped = (big_TF == 0).double()
    for rate in (dropped.mean(1), dropped.mean(0)):  # per token and per feature: no stripes
        n = big_TF.numel() / rate.numel()
        assert (rate - 0.3).abs().max() < 6 * (0.3 * 0.7 / n) ** 0.5
    # in the hidden's dtype (bf16 under autocast): float32 draws, as for a float32 mask
    torch.manual_seed(0)
    single_TF = layer._hidden_dropout_mask(x_TD, torch.float32)
    torch.manual_seed(0)
    low_TF = layer._hidden_dropout_mask(x_TD, torch.bfloat16)
    assert low_TF.dtype == torch.bfloat16 and torch.equal(low_TF == 0, single_TF == 0)
    low_kept = low_TF[low_TF != 0]
    assert torch.equal(low_kept, torch.full_like(low_kept, 1 / 0.7))
    layer.eval()
    assert layer._hidden_dropout_mask(x_TD, x_TD.dtype) is None


def test_lora_dropout_module() -> None:
    """LoRADropout (the layers' dropout on the LoRA input): in training x times a mask of 0 and
    1 / (1 - p), about p of them 0, gradient the same mask; the identity in eval mode; nn.Identity
    for p = 0."""
    from moetune.core.layers import LoRADropout, dropout_mask, lora_dropout

    drop = lora_dropout(0.25)
    assert isinstance(drop, LoRADropout) and isinstance(lora_dropout(0.0), nn.Identity)
    x = torch.randn(512, 64, dtype=torch.float64, requires_grad=True)
    y = drop.train()(x)
    mask = (y / x).detach()
    kept = mask != 0
    torch.testing.assert_close(mask[kept], torch.full_like(mask[kept], 1 / 0.75))
    assert abs((~kept).double().mean().item() - 0.25) < 6 * (0.25 * 0.75 / mask.numel()) ** 0.5
    y.sum().backward()
    torch.testing.assert_close(x.grad, mask)
    assert not torch.equal(drop(x), y)  # a fresh mask per call
    assert drop.eval()(x) is x
    # bf16: the uniforms are drawn in float32 (bf16 ones would drop 4.88% of the values at p = 0.05)
    mask = dropout_mask(torch.zeros(1, dtype=torch.bfloat16), (2000, 2000), 0.05)
    assert mask.dtype == torch.bfloat16
    assert abs((mask == 0).double().mean().item() - 0.05) < 5 * (0.05 * 0.95 / mask.numel()) ** 0.5


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_sorted_path_on_a_bfloat16_base(adapter_dtype: str) -> None:
    """bf16 base: the sorted inference path equals the dense one up to bf16 rounding, with float32
    adapters (deltas cast before they are added) and with bf16 adapters (added in place)."""
    cfg = moetune.MoEConfig(num_experts=4, r=4, lora_dropout=0.0, adapter_dtype=adapter_dtype)
    model = moetune.get_moe_model(tiny_model("llama", dtype=torch.bfloat16), cfg)
    randomize_(model, lora_std=0.05)
    model.eval()
    batch = tiny_batch("llama", batch=2, seq=9, padded=True)
    out = {}
    with torch.no_grad():
        for dispatch in ("dense", "sorted"):
            model._ctx.options.dispatch = dispatch
            out[dispatch] = model(**batch).logits.float()
    assert max_rel_error({"y": out["sorted"]}, {"y": out["dense"]}) < 1e-2  # measured 5.1e-3


@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
def test_one_expert_is_peft_lora(expert_type: str) -> None:
    """num_experts=1, top_k=1: the router's only choice has weight 1, so the model is peft's LoRA on the
    same projections with the same A, B and alpha / r (float64, eval mode: no dropout). This is how
    `moetune train` trains the one-LoRA baseline of a comparison."""
    from peft import LoraConfig, get_peft_model

    targets = ["gate_proj", "up_proj", "down_proj"]
    cfg = moetune.MoEConfig(
        num_experts=1, top_k=1, r=4, lora_alpha=8, expert_type=expert_type, lora_dropout=0.0
    )
    ours = moetune.get_moe_model(tiny_model("llama", dtype=torch.float64), cfg)
    randomize_(ours)
    peft_model = get_peft_model(
        tiny_model("llama", dtype=torch.float64),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets),
    )
    banks = {}  # (layer index, projection) -> our LoRAExperts
    for name, module in ours.named_modules():
        if isinstance(module, LoRAExperts):
            layer = int(name.split(".layers.")[1].split(".")[0])
            proj = next(p for p in targets if f".{p}" in name or name.endswith(f"experts.{p}"))
            banks[(layer, proj)] = module
    assert len(banks) == 3 * ours.config.num_hidden_layers
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and name.rsplit(".", 1)[-1] in targets:
                bank = banks[(int(name.split(".layers.")[1].split(".")[0]), name.rsplit(".", 1)[-1])]
                ((A, B),) = bank._pairs()
                module.lora_A["default"].weight.copy_(A[0])  # (r, d_in)
                module.lora_B["default"].weight.copy_(B[0])  # (d_out, r)
                assert module.scaling["default"] == bank.scaling == 2.0
    ours.eval()
    peft_model.eval()
    batch = tiny_batch("llama")
    with torch.no_grad():
        expected = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapters change the output
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
