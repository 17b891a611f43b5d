"""Quantized frozen bases (QLoRA-style, Dettmers et al. 2023): experts over torchao int8 weight-only
linears, on CPU.

torchao keeps each quantized weight as a tensor subclass with the logical shape and float dtype
(int8 data and per-row scales inside), so moetune reads d_in/d_out and the adapter dtype from it as from
a float weight. The base must compute with its quantized weights and keep them byte for byte: nothing
may dequantise it in place (training, saving, fingerprinting, merging).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from torchao.utils import TorchAOBaseTensor

import moetune
from moetune.core.experts import LoRAExperts
from moetune.core.layers import LoRALinear, MoEFFN, MoELinear
from moetune.core.merge import MergeError
from moetune.interop.export import ExportError, export_moe
from moetune.io.adapter import WEIGHTS_NAME
from moetune.io.provenance import BaseMismatchError, base_parameters, fingerprint, stored_tensors
from tests.helpers.numerics import randomize_, run
from tests.helpers.tiny_models import HIDDEN, INTERMEDIATE, LAYERS, tiny_batch, tiny_model

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def _decoder_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn != "lm_head"  # transformers' quantizers keep lm_head


def quantized_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The tiny Llama with every decoder linear quantized int8 weight-only (per-row scales)."""
    model = tiny_model("llama", seed=seed, dtype=dtype)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=_decoder_linear)
    return model


def config(expert_type: str, **overrides) -> moetune.MoEConfig:
    kw = dict(num_experts=4, top_k=2, r=4, lora_alpha=8, lora_dropout=0.0, attn_r=4)
    return moetune.MoEConfig(expert_type=expert_type, **(kw | overrides))


def quantized_weights(model: nn.Module) -> dict[str, Tensor]:
    """The base's quantized weights by their names in the base model (with or without the adapter)."""
    return {n: p for n, p in base_parameters(model) if isinstance(p, TorchAOBaseTensor)}


def stored_copy(model: nn.Module) -> dict[str, tuple[type, list[Tensor]]]:
    """For each quantized weight: its class and a copy of the tensors it stores (int8 data, scales)."""
    return {
        n: (type(p), [t.clone() for _, t in stored_tensors(p.detach())])
        for n, p in quantized_weights(model).items()
    }


def randomize(model: moetune.MoEModel) -> None:
    """Distinct experts and spread-out routing, with deltas small enough that fp32 rounding is not
    amplified from layer to layer (test_equivalence's default scales are meant for float64)."""
    randomize_(model, lora_std=0.1, router_std=0.5)


def assert_base_untouched(model: nn.Module, before: dict[str, tuple[type, list[Tensor]]]) -> None:
    """Every quantized weight still has its class, is frozen, and stores the same bytes."""
    now = quantized_weights(model)
    assert now.keys() == before.keys()
    for name, (kind, tensors) in before.items():
        p = now[name]
        assert type(p) is kind and not p.requires_grad and p.grad is None, name
        stored = [t for _, t in stored_tensors(p.detach())]
        assert len(stored) == len(tensors), name
        for got, want in zip(stored, tensors, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)), name


@pytest.mark.parametrize(
    "expert_type, dtype", [("ffn", torch.float32), ("linear", torch.float32), ("linear", torch.bfloat16)]
)
def test_experts_over_quantized_linears_start_at_the_quantized_base(expert_type, dtype):
    linears = tiny_model("llama").named_modules()
    float_shapes = {n: m.weight.shape for n, m in linears if _decoder_linear(m, n)}
    base = quantized_llama(dtype=dtype)
    batch = tiny_batch(base)
    with torch.no_grad():
        want = base(**batch).logits
    before = stored_copy(base)
    assert len(before) == LAYERS * LINEARS_PER_LAYER

    model = moetune.get_moe_model(base, config(expert_type))

    # the adapters have the logical shapes of the quantized weights and fp32 master weights
    banks = 0
    for name, module in model.base_model.named_modules():
        if isinstance(module, MoEFFN):
            pairs = [(f"{name}.{p}", bank) for p, bank in module.experts.items()]
        elif isinstance(module, (MoELinear, LoRALinear)):
            pairs = [(name, module.experts if isinstance(module, MoELinear) else module.lora)]
        else:
            continue
        for linear, bank in pairs:
            d_out, d_in = float_shapes[linear]
            assert (bank.d_in, bank.d_out) == (d_in, d_out), linear
            assert bank.lora_A[0].shape[1:] == (4, d_in) and bank.lora_B[0].shape[1:] == (d_out, 4)
            assert bank.lora_A[0].dtype == bank.lora_B[0].dtype == torch.float32
            banks += 1
    assert banks == LAYERS * (4 + 3)  # attention LoRA on q/k/v/o; experts on gate/up/down

    with torch.no_grad():
        got = model(**batch).logits
        with model.disable_adapter():
            assert torch.equal(model(**batch).logits, want)
    if expert_type == "linear":  # W x + 0: exactly the base
        assert torch.equal(got, want)
    else:  # the fast path mixes K equal slots with weights summing to 1: rounding only (1e-5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_base_untouched(base, before)


def _hand_layer(
    x: Tensor, weights: dict[str, Tensor], banks: dict[str, LoRAExperts], router_ED: Tensor, lora: bool = True
) -> Tensor:
    """Soft routing over E experts in float64 (p = softmax(x W_r^T)):
    `ffn` (banks gate/up/down, MixLoRA): sum_e p_e down_e(silu(gate_e(x)) * up_e(x)), W_e = W + s B_e A_e;
    `linear` (one bank): W x + sum_e p_e s B_e A_e x. `lora=False`: the frozen layer alone."""
    x = x.double()
    p_TE = F.softmax(x @ router_ED.double().T, -1)

    def w_e(proj: str, e: int) -> Tensor:
        bank = banks[proj]
        A, B = bank.lora_A[0][e].double(), bank.lora_B[0][e].double()
        return weights[proj].double() + (bank.scaling * B @ A if lora else 0)

    out = 0
    for e in range(router_ED.shape[0]):
        if "down_proj" in banks:
            h = F.silu(x @ w_e("gate_proj", e).T) * (x @ w_e("up_proj", e).T)
            y_e = h @ w_e("down_proj", e).T
        else:
            y_e = x @ w_e("gate_proj", e).T
        out = out + p_TE[:, e : e + 1] * y_e
    return out


@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
def test_layer_equals_the_formula_on_the_dequantized_weights(expert_type):
    """The MoE layer over the quantized linears (fast and reference path) equals the float64 formula on
    dequantised copies of its weights within 2e-6 of the output's scale: fp32 rounding (measured 2.4e-7;
    the int8 GEMM applies the per-row scale after the product). The formula on the unquantized original
    weights is 2e-3 away, and the experts' part is of the output's size: the test sees both."""
    model = moetune.get_moe_model(quantized_llama(), config(expert_type, router="soft", aux_loss_coef=0.0))
    randomize(model)
    mlp = model.base_model.model.layers[0].mlp
    original = tiny_model("llama").model.layers[0].mlp
    if expert_type == "ffn":
        layer, linears, banks = mlp, mlp.base_layer, dict(mlp.experts)
    else:  # the gate projection's own experts and router
        layer, linears, banks = mlp.gate_proj, mlp, {"gate_proj": mlp.gate_proj.experts}
    quantized = {p: getattr(linears, p) for p in banks}
    quantized = {p: getattr(m, "base_layer", m).weight for p, m in quantized.items()}
    assert all(isinstance(w, TorchAOBaseTensor) for w in quantized.values())
    dequantized = {p: w.dequantize() for p, w in quantized.items()}  # copies
    router = layer.router.weight
    x_TD = torch.randn(10, HIDDEN)
    with torch.no_grad():
        fast = layer(x_TD)
        with model.reference_path():
            reference = layer(x_TD)
        want = _hand_layer(x_TD, dequantized, banks, router)
        unquantized = _hand_layer(x_TD, {p: getattr(original, p).weight for p in banks}, banks, router)
        frozen = _hand_layer(x_TD, dequantized, banks, router, lora=False)
    scale = want.abs().max()
    for got in (fast, reference):
        assert (got.double() - want).abs().max() < 2e-6 * scale
    assert (unquantized - want).abs().max() > 1e-3 * scale
    assert (frozen - want).abs().max() > 0.3 * scale


@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
def test_training_saving_and_reloading_keep_the_quantized_base(expert_type, tmp_path):
    base = quantized_llama()
    before, trained_on = stored_copy(base), fingerprint(base)
    model = moetune.get_moe_model(base, config(expert_type))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".router." in n for n in trainable)
    assert not any(isinstance(p, TorchAOBaseTensor) for p in trainable.values())
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    batch = tiny_batch(base)
    model.train()
    losses = []
    for step in range(8):
        out = model(**batch)
        out.loss.backward()
        zero = sorted(n for n, p in trainable.items() if p.grad is None or not p.grad.any())
        if step == 0:  # B = 0 at the start: gradients reach every B and router, not yet A
            assert all(".lora_A." in n for n in zero), zero[:3]
        elif step == 1:
            assert zero == []
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert_base_untouched(base, before)
    assert fingerprint(base) == trained_on

    model.eval()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert not any("base_layer" in k for k in saved)  # the adapter alone
    fresh = quantized_llama()
    loaded = moetune.MoEModel.from_pretrained(fresh, tmp_path, strict=True)  # the fingerprint matches
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert_base_untouched(base, before)
    assert_base_untouched(fresh, before)


def test_a_base_loaded_quantized_by_transformers(tmp_path):
    """docs/quantization-and-memory.md's way: from_pretrained with a TorchAoConfig, then get_moe_model."""
    from transformers import AutoModelForCausalLM, TorchAoConfig

    tiny_model("llama").save_pretrained(tmp_path / "base")

    def load() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), dtype=torch.float32
        )

    base = load()
    assert len(stored_copy(base)) == LAYERS * LINEARS_PER_LAYER
    assert fingerprint(base) == fingerprint(quantized_llama())  # the same quantization as quantize_
    batch = tiny_batch(base)
    with torch.no_grad():
        want = base(**batch).logits
    model = moetune.get_moe_model(base, config("ffn"))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, want, rtol=1e-5, atol=1e-5)
    model.train()
    model(**batch).loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    model.eval().save_pretrained(tmp_path / "adapter")
    loaded = moetune.MoEModel.from_pretrained(load(), tmp_path / "adapter", strict=True)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("expert_type, dispatch", [("ffn", "dense"), ("ffn", "grouped"), ("linear", "auto")])
def test_fast_paths_equal_the_reference_on_a_quantized_base(expert_type, dispatch):
    """Logits and every adapter gradient, fast vs reference path. In fp32 (torchao's int8 weight-only
    linear takes no float64), so within fp32 rounding instead of test_equivalence's 1e-10: the unquantized
    fp32 model shows up to 3.6e-7 (logits) and 1.6e-6 (gradients) of their largest entry, the quantized
    one the same; the bounds leave 5-10x."""
    model = moetune.get_moe_model(quantized_llama(), config(expert_type))
    randomize(model)
    model._ctx.options.dispatch = dispatch
    if expert_type == "ffn":
        assert [layer.uses_grouped() for _, layer in model.moe_layers()] == [dispatch == "grouped"] * LAYERS
    batch = tiny_batch(model.base_model)
    model.train()
    fast_out, fast_grads = run(model, batch, reference=False)
    ref_out, ref_grads = run(model, batch, reference=True)
    assert (fast_out - ref_out).abs().max() <= 2e-6 * ref_out.abs().max()
    assert fast_grads.keys() == ref_grads.keys() and any(".lora_B." in n for n in fast_grads)
    for name, grad in ref_grads.items():
        assert grad.any(), name
        assert (fast_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def test_fingerprint_reads_the_stored_quantized_tensors(tmp_path, monkeypatch):
    quantized = fingerprint(quantized_llama())
    assert quantized == fingerprint(quantized_llama())  # deterministic
    assert quantized != fingerprint(tiny_model("llama"))  # not the float original
    assert quantized != fingerprint(quantized_llama(seed=1))  # other weights
    base = quantized_llama()
    weight_type = type(base.model.layers[0].mlp.up_proj.weight)

    def refuse(*_args, **_kwargs):
        raise AssertionError("the fingerprint dequantised a weight")

    with monkeypatch.context() as patch:
        patch.setattr(weight_type, "dequantize", refuse)
        assert fingerprint(base) == quantized

    moetune.get_moe_model(base, config("linear")).save_pretrained(tmp_path)
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path, strict=True)
    with pytest.warns(UserWarning, match="fingerprint"):
        moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path)  # loads onto the float base


def test_merge_and_export_refuse_a_quantized_base(tmp_path):
    base = quantized_llama()
    before = stored_copy(base)
    model = moetune.get_moe_model(base, config("linear", num_experts=1, top_k=1))
    randomize(model)
    batch = tiny_batch(base)
    with torch.no_grad():
        want = model(**batch).logits
    with pytest.raises(MergeError, match=r"self_attn\.q_proj: cannot merge.*unquantized"):
        model.merge_and_unload()
    assert_base_untouched(base, before)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)  # nothing merged, the adapter still in place

    ffn = moetune.get_moe_model(quantized_llama(), config("ffn", attn_r=0))
    with pytest.raises(ExportError, match="quantized"):
        export_moe(ffn, tmp_path / "mixtral")
    assert not (tmp_path / "mixtral").exists()
    assert INTERMEDIATE == 2 * HIDDEN  # the shapes the tests above assume (gate/up 32 -> 64)
