"""MoE-LoRA on the language model of a vision-language model (a tiny Llava built from a config)."""

from __future__ import annotations

import torch

import moetune
from moetune.core.layers import LoRALinear, MoEFFN, MoELinear
from tests.helpers.numerics import randomize_
from tests.helpers.tiny_models import tiny_llava_batch, tiny_model

VISION = ("vision_tower", "multi_modal_projector")


def _adapted(model: moetune.MoEModel) -> list[str]:
    kinds = (MoEFFN, MoELinear, LoRALinear)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def test_default_targets_stay_in_the_language_model() -> None:
    base = tiny_model("llava")
    vision_before = {n: p.clone() for n, p in base.named_parameters() if any(v in n for v in VISION)}
    model = moetune.get_moe_model(base, moetune.MoEConfig(num_experts=4, attn_r=4))
    adapted = _adapted(model)
    assert any(name.endswith("mlp") for name in adapted)
    assert any(name.endswith("q_proj") for name in adapted)
    assert not [name for name in adapted if any(v in name for v in VISION)]
    for name, p in model.named_parameters():
        if any(v in name for v in VISION):
            assert not p.requires_grad, name
            assert torch.equal(p, vision_before[name.removeprefix("base_model.")]), name


def test_fresh_injection_keeps_the_base_outputs_with_images() -> None:
    base = tiny_model("llava")
    batch = tiny_llava_batch(batch=2, seq=6, padded=True)
    with torch.no_grad():
        expected = base(**batch).logits
        model = moetune.get_moe_model(base, moetune.MoEConfig(num_experts=4, attn_r=4))
        got = model(**batch).logits
    real = batch["attention_mask"].bool()
    gap = (got - expected)[real].abs().max() / expected[real].abs().max()
    assert gap < 1e-5


def test_forward_backward_with_images_trains_only_the_adapter() -> None:
    base = tiny_model("llava")
    model = moetune.get_moe_model(base, moetune.MoEConfig(num_experts=4, attn_r=4, lora_dropout=0.0))
    randomize_(model)
    model.train()
    batch = tiny_llava_batch(batch=2, seq=6, padded=True)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert not [n for n in grads if any(v in n for v in VISION)]
    # every real token of the language stream (image features included) is routed, padding is not
    stats = next(iter(model.routing_stats().values()))
    assert stats["tokens"] == int(batch["attention_mask"].sum())


def test_save_and_reload_gives_identical_logits_with_images(tmp_path) -> None:
    cfg = moetune.MoEConfig(num_experts=4, attn_r=4, lora_dropout=0.0)
    model = moetune.get_moe_model(tiny_model("llava"), cfg)
    randomize_(model, seed=3)
    batch = tiny_llava_batch(batch=2, seq=6, padded=True)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = moetune.MoEModel.from_pretrained(tiny_model("llava"), tmp_path)
    with torch.no_grad():
        got = reloaded(**batch).logits
    assert torch.equal(got, expected)


def test_projector_is_adapted_when_named() -> None:
    """The vision side is untouched by default, not unreachable: naming its modules adapts them."""
    cfg = moetune.MoEConfig(
        expert_type="linear", num_experts=2, top_k=1, target_modules=r".*multi_modal_projector\.linear_1"
    )
    model = moetune.get_moe_model(tiny_model("llava"), cfg)
    assert _adapted(model) == [
        name for name, _ in model.named_modules() if name.endswith("multi_modal_projector.linear_1")
    ]
    out = model(**tiny_llava_batch(batch=2, seq=6))
    assert torch.isfinite(out.loss)
