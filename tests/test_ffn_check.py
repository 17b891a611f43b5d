"""No wrong model out of get_moe_model: a block that looks like a known feed-forward shape but computes
something else is refused (BitNet's sub-norm, Starcoder2's missing dropout), and so is injecting twice."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import moetune

try:
    from tests.tiny_models import tiny_batch, tiny_model
except ImportError:  # pragma: no cover - depends on how pytest sets sys.path
    from tiny_models import tiny_batch, tiny_model


def tiny(config_name: str):
    config = getattr(transformers, config_name)(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "config_name,cls,why",
    [
        ("BitNetConfig", "BitNetMLP", "differs from the decomposition's"),  # ffn_sub_norm before down_proj
        ("Starcoder2Config", "Starcoder2MLP", "no attribute 'dropout'"),
    ],
)
def test_lookalike_blocks_are_refused_and_linear_experts_work(config_name: str, cls: str, why: str) -> None:
    model = tiny(config_name)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    with pytest.raises(ValueError, match=rf"model\.layers\.0\.mlp \({cls}\).*{why}.*expert_type='linear'"):
        moetune.get_moe_model(model, moetune.MoEConfig(num_experts=4))
    assert not any(isinstance(m, moetune.layers.ADAPTER_MODULES) for m in model.modules())  # untouched
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)
    moe = moetune.get_moe_model(model, moetune.MoEConfig(expert_type="linear", num_experts=4))
    torch.testing.assert_close(logits(moe, ids), before, rtol=1e-5, atol=1e-6)  # B = 0: the base model


def test_the_check_is_what_refuses() -> None:
    """With check_ffn=False the BitNet block is taken as a Llama one: the fresh model's logits move,
    the wrong model the check prevents."""
    model = tiny("BitNetConfig")
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    moe = moetune.get_moe_model(model, moetune.MoEConfig(num_experts=4), check_ffn=False)
    assert (logits(moe, ids) - before).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "gemma", "qwen2"])
def test_known_blocks_pass_the_check(family: str) -> None:
    model = tiny_model(family)
    batch = tiny_batch(family)
    before = logits(model, batch["input_ids"])
    moe = moetune.get_moe_model(model, moetune.MoEConfig(num_experts=4))
    torch.testing.assert_close(logits(moe, batch["input_ids"]), before, rtol=1e-5, atol=1e-6)


def test_the_check_restores_training_mode() -> None:
    model = tiny_model("llama").train()
    moetune.get_moe_model(model, moetune.MoEConfig(num_experts=4))
    assert all(m.training for m in model.modules())


def test_injecting_twice_is_refused_before_anything_changes() -> None:
    model = tiny_model("llama")
    batch = tiny_batch("llama")
    moe = moetune.get_moe_model(model, moetune.MoEConfig(num_experts=4)).eval()
    for p in moe.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    expected = logits(moe, batch["input_ids"])
    for target in (model, moe):
        with pytest.raises(ValueError, match=r"already a moetune MoEFFN.*fresh base model"):
            moetune.get_moe_model(target, moetune.MoEConfig(num_experts=2))
    torch.testing.assert_close(logits(moe, batch["input_ids"]), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config_name,overrides,linears",
    [
        ("PhiConfig", {}, {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}),
        (
            "GPTJConfig",
            dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
            {"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"},
        ),
    ],
)
def test_linear_experts_default_to_every_linear_of_the_blocks(config_name, overrides, linears) -> None:
    """A family without a known FFN shape: `linear` experts on every linear layer of the decoder blocks
    (peft's all-linear), never the output head; with attn_r the attention projections get plain LoRA."""
    fields = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    config = getattr(transformers, config_name)(**(fields | overrides), bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    moe = moetune.get_moe_model(model, moetune.MoEConfig(expert_type="linear", num_experts=4))
    adapted = [name for name, _ in moe.moe_layers()]
    assert {n.rsplit(".", 1)[-1] for n in adapted} == linears
    assert len(adapted) == 2 * len(linears) and not any("lm_head" in n for n in adapted)
    torch.testing.assert_close(logits(moe, ids), before, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    with_attn = moetune.get_moe_model(
        AutoModelForCausalLM.from_config(config),
        moetune.MoEConfig(expert_type="linear", num_experts=4, attn_r=2),
    )
    routed = {n.rsplit(".", 1)[-1] for n, _ in with_attn.moe_layers()}
    assert routed == linears - {"q_proj", "k_proj", "v_proj"}
    lora = {
        n.rsplit(".", 1)[-1] for n, m in with_attn.named_modules() if isinstance(m, moetune.layers.LoRALinear)
    }
    assert {"q_proj", "k_proj", "v_proj"} <= lora
