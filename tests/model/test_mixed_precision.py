"""Mixed precision: bf16/fp16 bases, `adapter_dtype`, torch.autocast, and the HF Trainer's bf16/fp16 flags.

What must hold whatever the base's dtype: router logits, probabilities, weights and balance losses in fp32
(as the Switch Transformer's), routing statistics and the aux-loss-free bias update in fp64/fp32, LoRA
weights fp32 by default (peft's autocast_adapter_dtype) or in `adapter_dtype`, outputs in the base's dtype.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainingArguments

import moetune
from moetune.core import balance
from moetune.core.context import RouterRecord
from moetune.core.experts import LoRAExperts
from moetune.core.stats import PER_RANK_BUFFERS
from moetune.io.adapter import WEIGHTS_NAME, adapter_state_dict
from moetune.train.trainer import MoETrainer
from tests.helpers.models import ROUTERS, dataset, fresh, inputs, make_cfg
from tests.helpers.numerics import max_rel_error, randomize_
from tests.helpers.tiny_models import tiny_batch, tiny_model

HALF = [torch.bfloat16, torch.float16]
KINDS = [("llama", "ffn"), ("llama", "linear"), ("gpt2", "ffn"), ("gpt2", "linear")]  # gpt2: Conv1D
HALF_NAME = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# every part whose precision matters: attention LoRA, every balance loss (the contrastive one runs an
# einsum on the experts' outputs), the aux-loss-free bias
EVERY_PART = dict(attn_r=2, importance_loss_coef=0.1, contrastive_loss_coef=0.1, bias_update_rate=0.01)


def lora_params(moe: moetune.MoEModel) -> dict[str, torch.Tensor]:
    """Every LoRA weight: routed and shared experts, attention LoRA."""
    return {n: p for n, p in moe.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def router_tensors(moe: moetune.MoEModel) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in moe.moe_layers():
        out |= {f"{name}.router.{n}": t for n, t in layer.router.named_parameters()}
        out |= {f"{name}.router.{n}": t for n, t in layer.router.named_buffers()}
    return out


def assert_router_precision(moe: moetune.MoEModel) -> None:
    """Router weights, threshold net and expert bias fp32; running counts float64."""
    for name, t in router_tensors(moe).items():
        counts = name.rsplit(".", 1)[-1] in PER_RANK_BUFFERS  # the running statistics
        expected = torch.float64 if counts else torch.float32
        assert t.dtype == expected, (name, t.dtype)


def forward_with_records(
    moe: moetune.MoEModel, batch: dict, monkeypatch
) -> tuple[object, list[RouterRecord]]:
    """The forward's output and the RouterRecords its balance losses were computed from."""
    seen: list[RouterRecord] = []
    original = balance.per_router

    def capture(records, config):
        seen.extend(records)
        return original(records, config)

    monkeypatch.setattr(balance, "per_router", capture)
    out = moe(**batch)
    monkeypatch.undo()
    assert seen, "no router ran"
    return out, seen


def assert_fp32_routing(records: list[RouterRecord], aux: dict[str, torch.Tensor]) -> None:
    for rec in records:
        r = rec.routing
        assert (r.logits.dtype, r.probs.dtype, r.weights.dtype) == (torch.float32,) * 3, rec.name
        if rec.expert_outputs is not None:  # contrastive loss inputs: upcast inside the loss
            assert rec.expert_outputs.is_floating_point()
    assert aux and all(v.dtype == torch.float32 and bool(v.isfinite()) for v in aux.values()), aux


# ------------------------------------------------------------------------ (1) + (6) half-precision bases


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize(("family", "expert_type"), KINDS)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_half_precision_base_keeps_router_losses_and_master_weights_fp32(
    dtype, family, expert_type, router, monkeypatch
):
    """Defaults over a bf16/fp16 base: fp32 router math and losses, fp32 LoRA weights whose gradients
    (through the half-precision base path) are fp32, nonzero and finite; outputs in the base's dtype."""
    cfg = make_cfg(expert_type=expert_type, router=router, num_shared_experts=1, **EVERY_PART)
    moe = moetune.get_moe_model(fresh(family, dtype), cfg)
    assert {p.dtype for p in lora_params(moe).values()} == {torch.float32}
    assert_router_precision(moe)
    moe.train()
    out, records = forward_with_records(moe, tiny_batch(family), monkeypatch)
    assert_fp32_routing(records, moe.aux_losses())
    assert "contrastive_loss" in moe.aux_losses()
    assert out.logits.dtype == dtype and bool(out.loss.isfinite())
    out.loss.backward()
    for name, p in lora_params(moe).items():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert bool(p.grad.isfinite().all()), name
        if ".lora_B." in name:  # B = 0 at init: A gets no gradient yet, B does
            assert bool(p.grad.abs().max() > 0), name
    for name, layer in moe.moe_layers():
        g = layer.router.weight_blocks[0].grad
        assert g is not None and g.dtype == torch.float32 and bool(g.abs().max() > 0), name
    moe.update_expert_bias()
    assert_router_precision(moe)


@pytest.mark.parametrize("adapter_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize(
    "base_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
@pytest.mark.parametrize(("family", "expert_type"), [("llama", "ffn"), ("gpt2", "linear")])
def test_adapter_dtype_stores_the_lora_weights_in_that_dtype(
    base_dtype, adapter_dtype, family, expert_type, tmp_path
):
    """`adapter_dtype` sets every LoRA weight's dtype (gradients too); routers stay fp32, outputs follow
    the base, the saved tensors keep the dtype and reload bitwise."""
    cfg = make_cfg(expert_type=expert_type, attn_r=2, num_shared_experts=1, adapter_dtype=adapter_dtype)
    moe = moetune.get_moe_model(fresh(family, base_dtype), cfg)
    want = getattr(torch, adapter_dtype)
    assert {p.dtype for p in lora_params(moe).values()} == {want}
    assert_router_precision(moe)
    moe.train()
    out = moe(**tiny_batch(family))
    assert out.logits.dtype == base_dtype and bool(out.loss.isfinite())
    assert all(v.dtype == torch.float32 for v in moe.aux_losses().values())
    out.loss.backward()
    for name, p in lora_params(moe).items():
        assert p.grad is not None and p.grad.dtype == want and bool(p.grad.isfinite().all()), name
    with torch.no_grad():
        for p in lora_params(moe).values():
            p.normal_(0, 0.1)
    moe.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys() if ".lora_" in k} == {want}  # noqa: SIM118
    loaded = moetune.MoEModel.from_pretrained(fresh(family, base_dtype), tmp_path)
    assert loaded.moe_config.adapter_dtype == adapter_dtype
    saved, got = adapter_state_dict(moe), adapter_state_dict(loaded)
    assert all(got[k].dtype == saved[k].dtype and torch.equal(got[k], saved[k]) for k in saved)


@pytest.mark.parametrize("adapter_dtype", ["bfloat16", "float16"])
def test_grouped_path_in_half_precision_matches_the_dense_path(adapter_dtype):
    """The grouped GEMM (`torch._grouped_mm`, CPU) in bf16/fp16 over a base of that dtype: the dense
    path's output and gradients within that dtype's rounding (r=8 keeps the rows 16-byte aligned)."""
    results = {}
    dtype = getattr(torch, adapter_dtype)
    for dispatch in ("dense", "grouped"):
        torch.manual_seed(0)
        moe = moetune.get_moe_model(fresh("llama", dtype), make_cfg(r=8, adapter_dtype=adapter_dtype))
        with torch.no_grad():
            for p in lora_params(moe).values():
                p.normal_(0, 0.1)
        moe._ctx.options.dispatch = dispatch
        assert all(layer.uses_grouped() == (dispatch == "grouped") for _, layer in moe.moe_layers())
        out = moe(**tiny_batch("llama"))
        out.loss.backward()
        results[dispatch] = (out.logits.float(), {n: p.grad.float() for n, p in lora_params(moe).items()})
    (dense, dense_g), (grouped, grouped_g) = results["dense"], results["grouped"]
    tol = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(grouped, dense, rtol=tol, atol=tol * dense.abs().max().item())
    for name, g in dense_g.items():
        torch.testing.assert_close(grouped_g[name], g, rtol=tol, atol=tol * g.abs().max().item())


# ------------------------------------------------------------------------ (2) numerics against float64


def _randomize_(moe: moetune.MoEModel) -> None:
    """Experts that move the output by about its own size, routers far from uniform."""
    g = torch.Generator().manual_seed(0)
    for module in moe.modules():
        if isinstance(module, LoRAExperts):
            for B in module.lora_B:
                B.data = (torch.randn(B.shape, generator=g) * 0.01).to(B.dtype)
    for _, layer in moe.moe_layers():
        w = layer.router.weight_blocks[0]
        w.data = torch.randn(w.shape, generator=g) * 0.5


@pytest.mark.parametrize(
    ("router", "adapter_dtype"), [*((r, "auto") for r in ROUTERS), ("topk", "half")], ids=str
)
@pytest.mark.parametrize(("family", "expert_type"), KINDS)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_half_precision_moe_layer_error_is_the_base_layers_plus_a_few_roundings(
    dtype, family, expert_type, router, adapter_dtype
):
    """An MoE layer of a bf16/fp16 model against float64 from the same weights (upcast exactly), computed
    on the slow per-expert reference path.

    The router sees the same values in both (a bf16/fp16 input is exact in fp32) and computes in fp32 in
    both, so routing is identical and all the error is rounding. The MoE layer runs the base layer's own
    half-precision ops, whose error we measure on the same input (rel_base, relative to max |output|),
    plus a few more roundings to the base dtype (each expert delta added to a projection's output, the
    weighted sum of the slots), each at most u = eps / 2 of the magnitude (2^-8 bf16, 2^-11 fp16).
    Allowed: rel_base + 2u. Measured: at most rel_base + 0.9u. A routing change (e.g. bf16 router
    logits choosing other experts) or a lost expert would cost about the experts' effect (~0.5 of the
    output's magnitude here).
    """
    cfg = make_cfg(
        expert_type=expert_type,
        router=router,
        adapter_dtype=HALF_NAME[dtype] if adapter_dtype == "half" else "auto",
        aux_loss_coef=0.0,
    )
    moe = moetune.get_moe_model(fresh(family, dtype), cfg)
    _randomize_(moe)
    _, layer = next(moe.moe_layers())
    d_in = layer.router.weight.shape[1]
    x = torch.randn(64, d_in, generator=torch.Generator().manual_seed(1)).to(dtype)
    exact = copy.deepcopy(layer).double()  # base, experts: float64; the router keeps fp32 (Router._apply)
    exact.ctx.options.reference = True  # the copy's own context: the slow per-expert path
    with torch.no_grad():
        y, y_ref = layer(x), exact(x.double())
        y0, y0_ref = layer.base_layer(x), exact.base_layer(x.double())
    assert y.dtype == dtype and y_ref.dtype == torch.float64
    scale, scale0 = y_ref.abs().max().item(), y0_ref.abs().max().item()
    rel = (y.double() - y_ref).abs().max().item() / scale
    rel_base = (y0.double() - y0_ref).abs().max().item() / scale0
    moved = (y_ref - y0_ref).abs().max().item() / scale0
    u = torch.finfo(dtype).eps / 2
    print(
        f"rel error {rel:.2e}, base layer's {rel_base:.2e}, u {u:.2e}, experts move the output by {moved:.2f}"
    )
    assert moved > 0.2  # the experts matter
    assert rel <= rel_base + 2 * u


# ------------------------------------------------------------------------ (3) autocast over an fp32 model


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize(("family", "expert_type"), KINDS)
@pytest.mark.parametrize("autocast_dtype", HALF, ids=["bf16", "fp16"])
def test_autocast_leaves_routers_and_losses_fp32(autocast_dtype, family, expert_type, router, monkeypatch):
    """torch.autocast(cpu) over an fp32 model: the base runs in bf16/fp16, the routers and losses do not
    (F.linear under autocast would give half-precision logits), gradients are fp32 on the fp32 weights."""
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=autocast_dtype):
        assert F.linear(x, w).dtype == autocast_dtype  # what the router would get without its guard
    cfg = make_cfg(expert_type=expert_type, router=router, **EVERY_PART)
    moe = moetune.get_moe_model(fresh(family), cfg)
    moe.train()
    with torch.autocast("cpu", dtype=autocast_dtype):
        out, records = forward_with_records(moe, tiny_batch(family), monkeypatch)
    assert out.logits.dtype == autocast_dtype  # autocast did run the base in half precision
    assert_fp32_routing(records, moe.aux_losses())
    out.loss.backward()
    for name, p in moe.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad is not None, name
            assert p.grad.dtype == torch.float32 and bool(p.grad.isfinite().all()), name
    assert any(bool(p.grad.abs().max() > 0) for n, p in lora_params(moe).items() if ".lora_B." in n)


def test_autocast_router_logits_equal_the_fp32_models():
    """Under autocast the router's input is the base's output (computed in bf16), but its own math is the
    fp32 model's: on the same input the logits are bitwise those computed without autocast."""
    moe = moetune.get_moe_model(fresh("llama"), make_cfg())
    _, layer = next(moe.moe_layers())
    x = torch.randn(10, layer.router.weight.shape[1])
    mask = torch.ones(10, dtype=torch.bool)
    plain = layer.router(x, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = layer.router(x, mask)
    assert torch.equal(under.logits, plain.logits) and torch.equal(under.weights, plain.weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unguarded = layer.router._route(x, mask, False, None, None)  # the math without the guard
    assert unguarded.logits.dtype == torch.bfloat16


class LargeFloat32(TorchDispatchMode):
    """The ops that write a float32 tensor of at least `numel` elements (views write none): (op, shape)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                self.seen.append((func.overloadpacket.__name__, tuple(t.shape)))
        return out


@pytest.mark.parametrize("dispatch", ["dense", "grouped", "sorted"])
@pytest.mark.parametrize("autocast_dtype", HALF, ids=["bf16", "fp16"])
def test_autocast_ffn_slots_stay_in_half_precision(autocast_dtype, dispatch):
    """Under autocast the `ffn` slot tensors (K, T, F), the layer's largest, are computed in the autocast
    dtype with fp32 adapter weights: no op makes a float32 one, in forward or backward, with LoRA
    dropout on (its hidden mask is drawn in the hidden's dtype). Without dropout the fast path agrees
    with the per-expert reference path under the same autocast (outputs and gradients)."""
    sorted_path = dispatch == "sorted"  # inference: eval mode, no autograd
    T, K, F = 64, 2, 64

    def layer_with(dropout: float):
        moe = moetune.get_moe_model(fresh("llama"), make_cfg(r=8, lora_alpha=16, lora_dropout=dropout))
        randomize_(moe)
        moe.train(not sorted_path)
        _, layer = next(moe.moe_layers())
        layer.ctx.options.dispatch = dispatch
        assert layer.experts["up_proj"].dtype == torch.float32 and layer.slot_path() == dispatch
        return layer

    def run(layer, reference: bool = False):
        layer.ctx.options.reference = reference
        layer.zero_grad(set_to_none=True)
        x = torch.randn(T, layer.router.weight.shape[1], generator=torch.Generator().manual_seed(0))
        x.requires_grad_(not sorted_path)
        with torch.set_grad_enabled(not sorted_path), torch.autocast("cpu", dtype=autocast_dtype):
            y = layer(x)
        if sorted_path:
            return y, {}
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        return y.detach(), {"x": x.grad} | grads

    layer = layer_with(dropout=0.1)
    with LargeFloat32(K * T * F) as large:
        run(layer)
    assert large.seen == []
    layer = layer_with(dropout=0.0)
    (out, grads), (ref, ref_grads) = run(layer), run(layer, reference=True)
    assert out.dtype == ref.dtype == autocast_dtype and grads.keys() == ref_grads.keys()
    assert max_rel_error({"y": out, **grads}, {"y": ref, **ref_grads}) < 3e-2


def test_losses_stay_fp32_under_autocast():
    """The public loss functions turn autocast off (the contrastive loss's einsum would run in bf16)."""
    g = torch.Generator().manual_seed(0)
    logits, outputs = torch.randn(12, 4, generator=g), torch.randn(12, 4, 6, generator=g)
    active = torch.rand(12, 4, generator=g) > 0.5

    def every_loss() -> dict[str, torch.Tensor]:
        return {
            "aux": moetune.core.losses.switch_aux_loss(logits, 2),
            "z": moetune.core.losses.z_loss(logits),
            "imp": moetune.core.losses.importance_loss(logits, 2),
            "con": moetune.core.losses.contrastive_loss(outputs, active),
        }

    plain = every_loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.einsum("tid,tjd->tij", outputs, outputs).dtype == torch.bfloat16
        under = every_loss()
    for name, value in plain.items():
        assert under[name].dtype == torch.float32 and torch.equal(under[name], value), name


# ------------------------------------------------------------------------ (4) statistics and the bias


@pytest.mark.parametrize(
    "cast_after", [None, torch.bfloat16, torch.float16], ids=["base", "to_bf16", "to_fp16"]
)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_statistics_and_bias_update_stay_float64_and_fp32(dtype, cast_after):
    """Over a half-precision base, also after `moe.to(half)` (what transformers' bf16_full_eval does):
    counts past 256 (inexact in bf16) are exact, the entropy is the float64 one, and the bias moves by
    exactly +-rate in fp32. `.to(dtype)` casts the LoRA weights (as torch and peft do), not the routers."""
    rate = 0.01
    moe = moetune.get_moe_model(fresh("llama", dtype), make_cfg(bias_update_rate=rate))
    if cast_after is not None:
        moe.to(cast_after)
        assert {p.dtype for p in lora_params(moe).values()} == {cast_after}
    assert_router_precision(moe)
    seen = {}
    for name, layer in moe.moe_layers():
        layer.router.register_forward_hook(lambda m, a, r, name=name: seen.setdefault(name, []).append(r))
    ids = torch.randint(3, 127, (8, 40), generator=torch.Generator().manual_seed(0))
    moe.train()
    with torch.no_grad():
        for _ in range(2):  # 640 tokens x 2 slots over 4 experts: ~320 per expert
            moe(input_ids=ids)
    stats = moe.routing_stats()
    expected_bias = {}
    for name, layer in moe.moe_layers():
        router = layer.router
        counts = sum(r.assignment().sum(0).to(torch.int64) for r in seen[name])  # (E,)
        assert stats[name]["tokens_per_expert"] == counts.tolist() and counts.max() > 256
        assert torch.equal(router.step_counts, counts.to(torch.float64))
        p = torch.cat([r.probs for r in seen[name]]).double()
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1).mean().item()
        assert stats[name]["entropy"] == pytest.approx(entropy, rel=1e-12)
        step = rate * torch.sign(counts.double().mean() - counts.double())  # b += u sign(mean c - c)
        expected_bias[name] = router.expert_bias + step.float()
    moe.update_expert_bias()
    for name, layer in moe.moe_layers():
        assert layer.router.expert_bias.dtype == torch.float32
        assert torch.equal(layer.router.expert_bias, expected_bias[name]) and bool(expected_bias[name].any())
        assert not bool(layer.router.step_counts.any())


def test_router_keeps_its_dtypes_through_casts_and_moves():
    """`.to(dtype)` / `.half()` / `.double()` leave a router's dtypes (and the parameter objects an
    optimizer holds) alone; `router_dtype='float64'` routers stay float64."""
    for router_dtype, weight_dtype in (("float32", torch.float32), ("float64", torch.float64)):
        moe = moetune.get_moe_model(fresh("llama"), make_cfg(router="threshold", router_dtype=router_dtype))
        _, layer = next(moe.moe_layers())
        params = list(layer.router.parameters())
        out = moe(**inputs(tiny_batch("llama")))
        out.logits.sum().backward()
        assert all(p.grad is not None for p in params)
        for cast, dtype in (
            (lambda m: m.half(), torch.float16),
            (lambda m: m.to(torch.bfloat16), torch.bfloat16),
            (lambda m: m.double(), torch.float64),
            (lambda m: m.float(), torch.float32),
        ):
            cast(moe)
            assert moe.base_model.lm_head.weight.dtype == dtype  # the rest of the model follows
            assert list(layer.router.parameters()) == params
            assert {p.dtype for p in params} == {weight_dtype}
            assert all(p.grad.dtype == weight_dtype for p in params)
            assert layer.router.expert_bias.dtype == weight_dtype
            assert layer.router.load_counts.dtype == torch.float64


# ------------------------------------------------------------------------ config and old adapters


def test_adapter_dtype_config_round_trip_and_errors():
    cfg = moetune.MoEConfig(adapter_dtype="bfloat16")
    assert moetune.MoEConfig.from_json(cfg.to_json()) == cfg
    assert moetune.MoEConfig.from_dict({"r": 4}).adapter_dtype == "auto"  # a config from before the field
    assert "adapter_dtype" in moetune.MoEConfig.help()
    with pytest.raises(ValueError, match=r"adapter_dtype='int8' is not supported: allowed 'auto', 'float32'"):
        moetune.MoEConfig(adapter_dtype="int8")


def test_adapter_saved_before_adapter_dtype_existed_loads_unchanged(tmp_path):
    """An adapter whose config has no `adapter_dtype` (moetune before it) loads as "auto", without a
    warning: fp32 LoRA weights over a bf16 base, the saved values bitwise."""
    moe = moetune.get_moe_model(fresh("llama", torch.bfloat16), make_cfg(attn_r=2))
    with torch.no_grad():
        for p in lora_params(moe).values():
            p.normal_(0, 0.1)
    moe.save_pretrained(tmp_path)
    weights = str(tmp_path / WEIGHTS_NAME)
    with safe_open(weights, framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    for key in ("moetune_config",):
        data = json.loads(metadata[key])
        del data["adapter_dtype"]
        metadata[key] = json.dumps(data, indent=2, sort_keys=True)
    save_file(tensors, weights, metadata=metadata)
    (tmp_path / "moetune_config.json").write_text(metadata["moetune_config"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = moetune.MoEModel.from_pretrained(fresh("llama", torch.bfloat16), tmp_path)
    assert loaded.moe_config.adapter_dtype == "auto"
    got = adapter_state_dict(loaded)
    assert {got[k].dtype for k in got if ".lora_" in k} == {torch.float32}
    assert all(torch.equal(got[k], t) for k, t in tensors.items())


# ------------------------------------------------------------------------ (5) the Trainer's flags


def _train(flag: str | None, steps: int = 8) -> tuple[list[float], set, moetune.MoEModel]:
    """MoETrainer on CPU with TrainingArguments(bf16/fp16=True): losses per step, and what the MoE layers
    saw (input dtype, output dtype, router logits dtype, autocast on)."""
    torch.manual_seed(1)
    cfg = moetune.MoEConfig(num_experts=4, attn_r=4, bias_update_rate=0.01, lora_dropout=0.0)
    moe = moetune.get_moe_model(tiny_model("llama"), cfg)
    seen: set = set()
    for _, layer in moe.moe_layers():
        layer.register_forward_hook(
            lambda m, a, r: seen.add(("layer", a[0].dtype, r.dtype, torch.is_autocast_enabled("cpu")))
        )
        layer.router.register_forward_hook(lambda m, a, r: seen.add(("router", r.logits.dtype)))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=4,
            max_steps=steps,
            logging_steps=1,
            learning_rate=3e-2,
            lr_scheduler_type="constant",
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            save_strategy="no",
            **({flag: True} if flag else {}),
        )
        trainer = MoETrainer(model=moe, args=args, train_dataset=dataset(4))  # the same batch every step
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, seen, moe


def test_trainer_bf16_on_cpu_trains_with_fp32_routers_and_master_weights():
    losses, seen, moe = _train("bf16")
    assert ("layer", torch.float32, torch.bfloat16, True) in seen  # accelerate's bf16 autocast was on
    assert ("router", torch.float32) in seen and ("router", torch.bfloat16) not in seen
    assert all(torch.isfinite(torch.tensor(losses))) and len(losses) == 8
    assert losses[-1] < losses[0] - 0.05, losses
    assert {p.dtype for p in moe.parameters() if p.requires_grad} == {torch.float32}
    assert any(layer.router.expert_bias.abs().sum() > 0 for _, layer in moe.moe_layers())  # the bias moved


def test_trainer_fp16_on_cpu_trains_in_fp32():
    """TrainingArguments(fp16=True, use_cpu=True) is accepted, but accelerate (1.15) turns fp16 autocast
    and the gradient scaler on for GPUs only: on CPU it trains in fp32, the same losses as no flag."""
    losses, seen, _ = _train("fp16", steps=3)
    assert {s for s in seen if s[0] == "layer"} == {("layer", torch.float32, torch.float32, False)}
    reference, _, _ = _train(None, steps=3)
    assert losses == reference
