"""Upcycling a peft LoRA adapter into MoE-LoRA (`moetune.upcycle_lora`).

The reference is peft's own model: with noise 0 every expert equals the LoRA and the router weights sum
to 1, so the upcycled model's logits must be peft's (fp32 rounding apart, measured <= 8.2e-7).
"""

from __future__ import annotations

import os
import warnings

import peft
import pytest
import torch

import moetune
from moetune import MoEConfig
from moetune.core.layers import LoRALinear, MoEFFN, MoELinear
from tests.helpers.tiny_models import tiny_batch, tiny_model

LLAMA_TARGETS = ["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"]
GPT2_TARGETS = ["c_fc", "mlp.c_proj", "c_attn", "attn.c_proj"]


def peft_adapter(path, family: str, targets: list[str], seed: int = 1, **lora) -> peft.PeftModel:
    """A peft LoRA on a tiny model with random nonzero A, B (and perturbed modules_to_save), saved to
    `path`; returned in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out on Conv1D, etc.
        config = peft.LoraConfig(
            target_modules=targets, lora_dropout=0.0, fan_in_fan_out=family == "gpt2", **lora
        )
        model = peft.get_peft_model(tiny_model(family), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(path)
    return model.eval()


def logits(model, family: str) -> torch.Tensor:
    batch = tiny_batch(family)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


CASES = {
    # MoE scaling 16/4 = 4 vs peft 8/4 = 2: B is rescaled
    "llama-ffn-topk": (
        "llama",
        LLAMA_TARGETS,
        dict(r=4, lora_alpha=8, modules_to_save=["lm_head"]),
        MoEConfig(
            num_experts=4,
            top_k=2,
            r=4,
            lora_alpha=16,
            attn_r=4,
            lora_dropout=0.0,
            modules_to_save=["lm_head"],
        ),
    ),
    # rsLoRA on the peft side only, alpha_pattern on one projection, linear experts with soft routing
    "llama-linear-soft-rslora": (
        "llama",
        ["gate_proj", "up_proj", "down_proj"],
        dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 3}),
        MoEConfig(expert_type="linear", router="soft", aux_loss_coef=0.0, num_experts=3, r=4, lora_alpha=5),
    ),
    # rsLoRA on the MoE side only, top-p routing, shared experts (fresh: B = 0, they add nothing)
    "llama-ffn-topp-shared": (
        "llama",
        ["gate_proj", "down_proj", "k_proj"],
        dict(r=4, lora_alpha=8),
        MoEConfig(router="topp", num_experts=3, num_shared_experts=1, r=4, use_rslora=True, attn_r=4),
    ),
    # GPT-2: Conv1D projections, attention LoRA on the fused c_attn
    "gpt2-ffn-topk": (
        "gpt2",
        GPT2_TARGETS,
        dict(r=4, lora_alpha=8),
        MoEConfig(num_experts=4, top_k=2, r=4, lora_alpha=8, attn_r=4),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_upcycled_model_equals_peft_lora(tmp_path, case):
    family, targets, lora, cfg = CASES[case]
    reference = peft_adapter(tmp_path, family, targets, **lora)
    expected = logits(reference, family)
    with reference.disable_adapter():
        effect = (expected - logits(reference, family)).abs().max().item()
    assert effect > 0.1  # the LoRA changes the logits: equality below is not trivial

    model = moetune.upcycle_lora(tiny_model(family), tmp_path, cfg).eval()
    diff = (logits(model, family) - expected).abs().max().item()
    assert diff <= 1e-5, f"{case}: max |logit difference| {diff:.3g} vs peft (LoRA effect {effect:.3g})"
    for _, layer in model.moe_layers():
        banks = layer.experts.values() if isinstance(layer, MoEFFN) else [layer.experts]
        for bank in banks:
            E = layer.router.num_experts
            A, B = bank.lora_A[0][:E], bank.lora_B[0][:E]
            assert torch.equal(B, B[:1].expand_as(B))  # all zero (fresh) where the adapter has no LoRA
            assert not B.any() or torch.equal(A, A[:1].expand_as(A))


def test_noise_breaks_symmetry_and_stays_close(tmp_path):
    cfg = MoEConfig(num_experts=4, top_k=2, r=4, lora_alpha=8, attn_r=4, modules_to_save=["lm_head"])
    reference = peft_adapter(tmp_path, "llama", LLAMA_TARGETS, r=4, lora_alpha=8, modules_to_save=["lm_head"])
    expected = logits(reference, "llama")
    with reference.disable_adapter():
        effect = (expected - logits(reference, "llama")).abs().max().item()
    noisy = moetune.upcycle_lora(tiny_model("llama"), tmp_path, cfg, noise=0.01, seed=0).eval()
    again = moetune.upcycle_lora(tiny_model("llama"), tmp_path, cfg, noise=0.01, seed=0)
    other = moetune.upcycle_lora(tiny_model("llama"), tmp_path, cfg, noise=0.01, seed=1)

    A_lora = reference.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"].weight
    bank = noisy.base_model.model.layers[0].mlp.experts["up_proj"]
    A_E = bank.lora_A[0].detach()
    eps_E = A_E - A_lora
    assert torch.cdist(A_E.flatten(1), A_E.flatten(1)).triu(1)[0, 1:].min() > 0  # experts all differ
    assert 0.008 < eps_E.std().item() / A_lora.std().item() < 0.012  # std = noise * std(A)
    assert torch.equal(A_E, again.base_model.model.layers[0].mlp.experts["up_proj"].lora_A[0])  # seeded
    assert not torch.equal(A_E, other.base_model.model.layers[0].mlp.experts["up_proj"].lora_A[0])
    diff = (logits(noisy, "llama") - expected).abs().max().item()
    assert 0 < diff < 0.2 * effect, f"noise 0.01: max |logit difference| {diff:.3g}, LoRA effect {effect:.3g}"


def test_default_config_takes_the_adapter_shape(tmp_path):
    reference = peft_adapter(tmp_path, "llama", LLAMA_TARGETS, r=2, lora_alpha=6, use_rslora=True)
    model = moetune.upcycle_lora(tiny_model("llama"), tmp_path).eval()
    cfg = model.moe_config
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.attn_r) == (2, 6, True, 2)
    assert (logits(model, "llama") - logits(reference, "llama")).abs().max().item() <= 1e-5


def _assert_untouched(base, before: torch.Tensor) -> None:
    assert not any(isinstance(m, (MoEFFN, MoELinear, LoRALinear)) for m in base.modules())
    assert torch.equal(logits(base, "llama"), before)


@pytest.mark.parametrize(
    "lora, cfg, match",
    [
        (dict(r=4), MoEConfig(r=8, attn_r=4), r"rank 4 but the MoEConfig has r=8"),
        (dict(r=4), MoEConfig(r=4, attn_r=2), r"q_proj' has rank 4 but the MoEConfig has attn_r=2"),
        (dict(r=4), MoEConfig(r=4), r"LoRA on 'model\.layers\.0\.self_attn\.q_proj', which this MoEConfig"),
        (
            dict(r=4),
            MoEConfig(r=4, attn_r=4, target_modules=["up_proj"]),
            r"LoRA on 'model\.layers\.0\.mlp\.down",
        ),
        (
            dict(r=4, modules_to_save=["lm_head"]),
            MoEConfig(r=4, attn_r=4),
            r"'lm_head\.weight'.*modules_to_save",
        ),
        (dict(r=4, use_dora=True), MoEConfig(r=4, attn_r=4), r"use_dora=True"),
    ],
)
def test_refusals_leave_the_base_untouched(tmp_path, lora, cfg, match):
    peft_adapter(tmp_path, "llama", LLAMA_TARGETS, **lora)
    base = tiny_model("llama")
    before = logits(base, "llama")
    with pytest.raises(ValueError, match=match):
        moetune.upcycle_lora(base, tmp_path, cfg)
    _assert_untouched(base, before)


def test_refuses_other_peft_methods_and_bad_arguments(tmp_path):
    ia3 = peft.get_peft_model(
        tiny_model("llama"), peft.IA3Config(target_modules=["up_proj"], feedforward_modules=[])
    )
    ia3.save_pretrained(tmp_path / "ia3")
    base = tiny_model("llama")
    before = logits(base, "llama")
    with pytest.raises(ValueError, match=r"peft_type='IA3': only peft LoRA"):
        moetune.upcycle_lora(base, tmp_path / "ia3", MoEConfig(r=4))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        moetune.upcycle_lora(base, tmp_path / "missing", MoEConfig(r=4))
    peft_adapter(tmp_path / "lora", "llama", ["up_proj"], r=4)
    for noise in (-0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="noise="):
            moetune.upcycle_lora(base, tmp_path / "lora", MoEConfig(r=4), noise=noise)
    os.remove(tmp_path / "lora" / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        moetune.upcycle_lora(base, tmp_path / "lora", MoEConfig(r=4))
    _assert_untouched(base, before)
