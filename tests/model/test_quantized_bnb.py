"""Quantized frozen bases with bitsandbytes (QLoRA, Dettmers et al. 2023): 4-bit NF4 and 8-bit LLM.int8
linears, loaded the way QLoRA users do (`from_pretrained(..., quantization_config=BitsAndBytesConfig)`).

bitsandbytes >= 0.48 runs both on CPU. Its weights are integer tensors (Params4bit: packed uint8 of shape
(d_in d_out / 2, 1); Int8Params: int8 (d_out, d_in) with per-row scales `SCB`); moetune reads the shapes
from the modules' in/out features. The tiny Llama here is 64 wide: the 4-bit CPU kernels want d_in a
multiple of the 64-value quantization block.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import moetune
from moetune.core.layers import LoRALinear, MoEFFN, MoELinear
from moetune.core.merge import MergeError
from moetune.io.provenance import _saved_layout, base_parameters, fingerprint
from tests.helpers.numerics import randomize_, run
from tests.helpers.tiny_models import _llama_config, tiny_batch

bnb = pytest.importorskip("bitsandbytes")
functional = pytest.importorskip("bitsandbytes.functional")

WIDTH, FFN_WIDTH, LAYERS = 64, 128, 2
QUANTS = ["nf4", "int8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A float tiny Llama, 64 wide, saved to load quantized."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = _llama_config(hidden_size=WIDTH, intermediate_size=FFN_WIDTH, head_dim=16)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("bnb") / "base"
    model.save_pretrained(path)
    return str(path)


def load(checkpoint: str, quant: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant == "nf4":
        qc = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "inputs will be cast to float16", "kernels" not installed, ...
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=qc, device_map="cpu", dtype=torch.float32
        )
    return model.train()  # training mode: no CPU inference repacking until a test asks for it


def config(expert_type: str, **overrides) -> moetune.MoEConfig:
    kw = dict(num_experts=4, top_k=2, r=4, lora_alpha=8, lora_dropout=0.0, attn_r=4)
    return moetune.MoEConfig(expert_type=expert_type, **(kw | overrides))


def quantized_weights(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in base_parameters(model) if isinstance(p, (bnb.nn.Params4bit, bnb.nn.Int8Params))}


def stored_copy(model: nn.Module) -> dict[str, tuple[type, list[Tensor]]]:
    """For each quantized weight: its class, a copy of its data in the saved layout and its scales."""
    owners = {
        id(m.weight): m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    }
    out = {}
    for name, p in quantized_weights(model).items():
        if isinstance(p, bnb.nn.Params4bit):
            scales = p.quant_state.absmax
        else:  # the first forward moves the row scales to the module's state
            scales = p.SCB if p.SCB is not None else owners[id(p)].state.SCB
        out[name] = (type(p), [_saved_layout(p).detach().clone(), scales.clone()])
    return out


def assert_base_untouched(model: nn.Module, before: dict[str, tuple[type, list[Tensor]]], scales=True):
    now = stored_copy(model)
    assert now.keys() == before.keys() and len(now) == LAYERS * 7
    for name, (kind, tensors) in before.items():
        p = quantized_weights(model)[name]
        assert type(p) is kind and not p.requires_grad and p.grad is None, name
        for got, want in list(zip(now[name][1], tensors, strict=True))[: 2 if scales else 1]:
            assert got.dtype == want.dtype and torch.equal(got, want), name


def dequantized(weight: Tensor) -> Tensor:
    if isinstance(weight, bnb.nn.Params4bit):
        return functional.dequantize_4bit(weight.data, weight.quant_state)
    return functional.int8_vectorwise_dequant(weight.data, weight.SCB)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
def test_experts_over_bnb_linears_start_at_the_base(checkpoint, quant, expert_type):
    base = load(checkpoint, quant)
    batch = tiny_batch("llama")
    with torch.no_grad():
        want = base(**batch).logits
    before = stored_copy(base)
    model = moetune.get_moe_model(base, config(expert_type))
    banks = [m.experts for m in model.modules() if isinstance(m, MoELinear)]
    banks += [b for m in model.modules() if isinstance(m, MoEFFN) for b in m.experts.values()]
    banks += [m.lora for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(banks) == LAYERS * 7
    for bank in banks:
        assert {bank.d_in, bank.d_out} <= {WIDTH, FFN_WIDTH, 32}  # k/v: 2 heads of 16
        assert bank.lora_A[0].dtype == torch.float32
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_base_untouched(base, before)


@pytest.mark.parametrize("quant", QUANTS)
def test_ffn_layer_equals_the_formula_on_dequantized_weights(checkpoint, quant):
    """MixLoRA with soft routing, float64 on dequantised copies of the 3 projections; fp32 rounding."""
    model = moetune.get_moe_model(load(checkpoint, quant), config("ffn", router="soft", aux_loss_coef=0.0))
    randomize_(model, lora_std=0.1, router_std=0.5)
    layer = model.base_model.model.layers[0].mlp
    W = {p: dequantized(getattr(layer.base_layer, p).weight).double() for p in layer.experts}
    x_TD = torch.randn(10, WIDTH)
    with torch.no_grad():
        got = layer(x_TD).double()
        x = x_TD.double()
        p_TE = F.softmax(x @ layer.router.weight.double().T, -1)
        want = 0
        for e in range(4):
            We = {
                p: W[p] + b.scaling * b.lora_B[0][e].double() @ b.lora_A[0][e].double()
                for p, b in layer.experts.items()
            }
            h = F.silu(x @ We["gate_proj"].T) * (x @ We["up_proj"].T)
            want = want + p_TE[:, e : e + 1] * (h @ We["down_proj"].T)
    assert (got - want).abs().max() < 2e-6 * want.abs().max()


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
def test_training_saving_and_reloading_keep_the_bnb_base(checkpoint, quant, expert_type, tmp_path):
    base = load(checkpoint, quant)
    before, trained_on = stored_copy(base), fingerprint(base)
    model = moetune.get_moe_model(base, config(expert_type))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".router." in n for n in trainable)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    batch = tiny_batch("llama")
    losses = []
    for step in range(6):
        out = model(**batch)
        out.loss.backward()
        zero = sorted(n for n, p in trainable.items() if p.grad is None or not p.grad.any())
        assert all(".lora_A." in n for n in zero) if step == 0 else zero == [], zero[:3]
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert_base_untouched(base, before)

    # inference: bitsandbytes' CPU kernel repacks a 4-bit weight in place on CPUs with AVX512-BF16 (and
    # rounds its scales to bf16); the fingerprint reads the saved layout, saving does not unpack
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    linear = model.base_model.model.layers[0].self_attn.q_proj.base_layer
    packed = getattr(linear.weight, "quant_state", None)
    packed = bool(getattr(packed, "packing_format_for_cpu", False))
    assert packed == (quant == "nf4" and bool(getattr(linear, "support_avx512bf16_for_cpu", False)))
    assert fingerprint(base) == trained_on
    model.save_pretrained(tmp_path)
    assert_base_untouched(base, before, scales=not packed)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)  # saving changed nothing
    loaded = moetune.MoEModel.from_pretrained(load(checkpoint, quant), tmp_path, strict=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, logits)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("expert_type, dispatch", [("ffn", "dense"), ("ffn", "grouped"), ("linear", "auto")])
def test_fast_paths_equal_the_reference_on_a_bnb_base(checkpoint, quant, expert_type, dispatch):
    """As test_quantized's torchao case; bounds: measured up to 1.2e-6 (logits) and 5e-6 (gradients)."""
    model = moetune.get_moe_model(load(checkpoint, quant), config(expert_type))
    randomize_(model, lora_std=0.1, router_std=0.5)
    model._ctx.options.dispatch = dispatch
    if expert_type == "ffn":
        assert [layer.uses_grouped() for _, layer in model.moe_layers()] == [dispatch == "grouped"] * LAYERS
    batch = tiny_batch("llama")
    fast_out, fast_grads = run(model, batch, reference=False)
    ref_out, ref_grads = run(model, batch, reference=True)
    assert (fast_out - ref_out).abs().max() <= 1e-5 * ref_out.abs().max()
    assert fast_grads.keys() == ref_grads.keys() and any(".lora_B." in n for n in fast_grads)
    for name, grad in ref_grads.items():
        assert grad.any() and (fast_grads[name] - grad).abs().max() <= 5e-5 * grad.abs().max(), name


@pytest.mark.parametrize("quant", QUANTS)
def test_merge_refuses_a_bnb_base(checkpoint, quant):
    base = load(checkpoint, quant)
    before = stored_copy(base)
    model = moetune.get_moe_model(base, config("linear", num_experts=1, top_k=1))
    with pytest.raises(MergeError, match=r"self_attn\.q_proj: cannot merge.*unquantized"):
        model.merge_and_unload()
    assert_base_untouched(base, before)
