"""No wrong model out of get_moe_model: a block that looks like a known feed-forward shape but computes
something else is refused (BitNet's sub-norm, Starcoder2's missing dropout), and so is injecting twice."""

from __future__ import annotations

import pytest
import torch

import moetune
from tests.helpers.family_matrix import ids as family_ids
from tests.helpers.family_matrix import tiny_model as family_model
from tests.helpers.tiny_models import tiny_batch, tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "family,module,why",
    [
        ("dory", r"model\.layers\.0\.mlp \(DoryMLP\)", "differs from the decomposition's"),  # scaled, L2 norm
        ("opt", r"model\.decoder\.layers\.0 \(OPTDecoderLayer\)", "differs from the decomposition.s"),
    ],
)
def test_lookalike_blocks_are_refused_and_linear_experts_work(family: str, module: str, why: str) -> None:
    """Dory's MLP has BitNet's names and computes something else; OPT's decoder layer holds fc1/fc2 (and
    its attention): both refused before anything changes, and `linear` experts work on them."""
    from tests.helpers.family_matrix import ids, tiny_model

    model = tiny_model(family)
    before = logits(model, ids())
    with pytest.raises(ValueError, match=rf"{module}.*{why}.*expert_type='linear'"):
        moetune.get_moe_model(model, moetune.MoEConfig(num_experts=4))
    assert not any(isinstance(m, moetune.core.layers.AdapterLayer) for m in model.modules())  # untouched
    torch.testing.assert_close(logits(model, ids()), before, rtol=0, atol=0)
    moe = moetune.get_moe_model(model, moetune.MoEConfig(expert_type="linear", num_experts=4))
    torch.testing.assert_close(logits(moe, ids()), before, rtol=1e-5, atol=1e-6)  # B = 0: the base model


def test_the_check_is_what_refuses() -> None:
    """With check_ffn=False Dory's block is taken for BitNet's: the fresh model's logits move, the
    wrong model the check prevents."""
    model = family_model("dory")
    ids = family_ids()
    before = logits(model, ids)
    moe = moetune.get_moe_model(model, moetune.MoEConfig(num_experts=4), check_ffn=False)
    assert (logits(moe, ids) - before).abs().max() > 1e-3 * before.abs().max()  # a right fresh model: ~1e-7


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


def test_linear_experts_default_to_every_linear_of_the_blocks() -> None:
    """A family without a known FFN shape (BLOOM): `linear` experts on every linear layer of the decoder
    blocks (peft's all-linear), never the output head; with attn_r the attention projections get plain
    LoRA instead (MiniMax: its q/k/v/o and qkv_proj)."""
    from tests.helpers.family_matrix import ids as batch_ids
    from tests.helpers.family_matrix import tiny_model as family_model

    model = family_model("bloom")
    before = logits(model, batch_ids())
    moe = moetune.get_moe_model(model, moetune.MoEConfig(expert_type="linear", num_experts=4))
    adapted = [name for name, _ in moe.moe_layers()]
    linears = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == linears and len(adapted) == 2 * len(linears)
    torch.testing.assert_close(logits(moe, batch_ids()), before, rtol=1e-5, atol=1e-6)

    cfg = moetune.MoEConfig(expert_type="linear", num_experts=4, attn_r=2)
    with_attn = moetune.get_moe_model(family_model("minimax"), cfg)
    routed = {n.rsplit(".", 1)[-1] for n, _ in with_attn.moe_layers()}
    lora = {
        n.rsplit(".", 1)[-1]
        for n, m in with_attn.named_modules()
        if isinstance(m, moetune.core.layers.LoRALinear)
    }
    assert routed and not routed & lora
    assert lora <= {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"} and "lm_head" not in routed


def test_bitnet_sub_norm_is_computed() -> None:
    """BitNet's block, down(ffn_sub_norm(act(gate(x)) * up(x))): `ffn` experts with the sub-norm inside
    each expert; a fresh model gives the base logits, and with random experts the fast path equals the
    per-expert reference (float64, outputs and gradients)."""
    from tests.helpers.numerics import assert_paths_agree, randomize_

    model = family_model("bitnet")
    ids = family_ids()
    before = logits(model, ids)
    moe = moetune.get_moe_model(model, moetune.MoEConfig(num_experts=4)).eval()
    assert [layer.spec.family for _, layer in moe.moe_layers()] == ["gated_subnorm"] * 2
    torch.testing.assert_close(logits(moe, ids), before, rtol=1e-5, atol=1e-6)
    model64 = family_model("bitnet").double()
    cfg = moetune.MoEConfig(
        num_experts=4, r=3, lora_dropout=0.0, router_dtype="float64", num_shared_experts=1
    )
    moe64 = moetune.get_moe_model(model64, cfg)
    randomize_(moe64)
    assert_paths_agree(moe64, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})


@pytest.mark.parametrize(
    "family,shape",
    [
        ("nemotron", "up_down"),
        ("phi", "fc"),
        ("gptj", "fc_in_out"),
        ("gpt_neox", "neox"),
        ("persimmon", "neox"),
    ],
)
def test_non_gated_blocks_fast_path_equals_reference(family: str, shape: str) -> None:
    """The non-gated `ffn` shapes: with random experts and a shared one, the fast path equals the
    per-expert reference in float64 (outputs and gradients)."""
    from tests.helpers.numerics import assert_paths_agree, randomize_

    cfg = moetune.MoEConfig(
        num_experts=4,
        r=3,
        lora_dropout=0.0,
        router_dtype="float64",
        num_shared_experts=1,
        importance_loss_coef=0.1,
    )
    moe = moetune.get_moe_model(family_model(family).double(), cfg)
    assert {layer.spec.family for _, layer in moe.moe_layers()} == {shape}
    randomize_(moe, tie=True)
    batch = family_ids()
    assert_paths_agree(moe, {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": batch})


@pytest.mark.parametrize("family", ["lfm2", "starcoder2"])
def test_inline_silu_and_functional_dropout_blocks(family: str) -> None:
    """LFM2's block writes its SiLU in the forward (no activation module); Starcoder2's ends in a
    functional dropout of probability `residual_dropout`: both are `ffn` blocks, their fast path equals
    the reference in float64, and in training the dropout is the block's own."""
    from tests.helpers.family_matrix import ids, tiny_model
    from tests.helpers.numerics import assert_paths_agree, randomize_

    model = tiny_model(family).double()
    cfg = moetune.MoEConfig(num_experts=4, r=3, lora_dropout=0.0, router_dtype="float64")
    moe = moetune.get_moe_model(model, cfg)
    assert {layer.spec.family for _, layer in moe.moe_layers()} == {family}
    randomize_(moe)
    for _, layer in moe.moe_layers():  # no dropout: the two paths see the same outputs
        if layer.spec.post_dropout:
            setattr(layer.base_layer, layer.spec.post_dropout, 0.0)
    batch = ids()
    assert_paths_agree(moe, {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": batch})
    if family == "starcoder2":
        layer = next(layer for _, layer in moe.moe_layers())
        layer.base_layer.residual_dropout = 0.5
        y = torch.ones(1000, dtype=torch.float64)
        layer.train()
        dropped = layer._post(y)
        assert 0.35 < (dropped == 0).double().mean() < 0.65 and set(dropped.unique().tolist()) <= {0.0, 2.0}
        layer.eval()
        assert torch.equal(layer._post(y), y)
