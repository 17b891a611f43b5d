"""MixLoRA adapters (MoE-PEFT's format, read by the `mixlora` package 0.2.3) <-> moetune adapters.

The truth is the mixlora package itself: an adapter it builds and injects gives the same logits as the
converted moetune adapter, and a moetune adapter exported to MixLoRA gives the same logits when the
package loads it. Random nonzero LoRA A, B and router weights, eval mode, no jitter.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from mixlora import MixLoraConfig, inject_adapter_in_model, load_adapter_weights
from safetensors.torch import load_file

import moetune
from moetune.app.cli import main
from moetune.config import CONFIG_NAME
from moetune.interop import mixlora
from moetune.io.adapter import WEIGHTS_NAME, read_weights
from moetune.io.provenance import BaseMismatchError
from tests.helpers.tiny_models import tiny_batch, tiny_model

ATTN = {
    "llama": ["q_proj", "v_proj", "o_proj"],
    "qwen2": ["k_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
}
MLP = {
    "llama": ["gate_proj", "up_proj", "down_proj"],
    "qwen2": ["gate_proj", "up_proj", "down_proj"],
    "phi3": ["gate_up_proj", "down_proj"],
}
TOL = 2e-6  # fp32 logits (|logit| < 0.5): the same terms summed in another order; measured <= 3e-7


# ---- helpers ----------------------------------------------------------------------------------------
def mixlora_config(family: str, num_experts: int = 4, attention: bool = True, **extra) -> dict:
    return {
        "base_model_name_or_path": f"tiny-{family}",
        "task_type": "CAUSAL_LM",
        "peft_type": "MIXLORA",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.05,  # the mixlora package asserts > 0 (eval mode turns it off)
        "target_modules": (ATTN[family] if attention else []) + MLP[family],
        "routing_strategy": "mixlora",
        "num_experts": num_experts,
        "top_k": 2,
        "act_fn": "silu",
        **extra,
    }


def random_mixlora_weights(family: str, cfg: dict, seed: int = 1) -> dict[str, torch.Tensor]:
    """Nonzero A, B and gates for every target of every layer, named as MixLoRA names them."""
    g = torch.Generator().manual_seed(seed)
    base, weights = tiny_model(family), {}

    def lora(prefix: str, lin: torch.nn.Linear) -> None:
        weights[f"{prefix}.lora_A.weight"] = torch.randn(cfg["r"], lin.in_features, generator=g) / 4
        weights[f"{prefix}.lora_B.weight"] = torch.randn(lin.out_features, cfg["r"], generator=g) / 2

    for i, layer in enumerate(base.model.layers):
        for p in cfg["target_modules"]:
            if hasattr(layer.self_attn, p):
                lora(f"mixlora.layers.{i}.self_attn.{p}", getattr(layer.self_attn, p))
            for j in range(cfg["num_experts"]) if hasattr(layer.mlp, p) else ():
                lora(f"mixlora.layers.{i}.mlp.{p}.experts.{j}", getattr(layer.mlp, p))
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(
            cfg["num_experts"], base.config.hidden_size, generator=g
        )
    return weights


def mixlora_model(family: str, cfg: MixLoraConfig, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A tiny model with the adapter injected by the mixlora package, in eval mode everywhere: its new
    LoRA modules start in training mode and its experts live in plain dicts that `.eval()` misses."""
    model = tiny_model(family)
    inject_adapter_in_model(model, cfg, weights)
    model.eval()
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for lin in moe.experts_.values():
                lin.eval()
    return model


def package_config(cfg: dict) -> MixLoraConfig:
    config = MixLoraConfig.from_config(cfg)
    config.adapter_name_, config.dtype_ = "default", torch.float32
    return config.check()


def write_mixlora(directory, cfg: dict, weights: dict[str, torch.Tensor]) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, mixlora.MIXLORA_CONFIG), "w") as fh:
        json.dump(cfg, fh)
    torch.save(weights, os.path.join(directory, mixlora.MIXLORA_WEIGHTS))
    return str(directory)


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def random_moetune(family: str, seed: int = 2, **overrides) -> moetune.MoEModel:
    """A moetune adapter with every trainable tensor random and nonzero, in eval mode."""
    cfg = dict(num_experts=4, top_k=2, r=4, lora_alpha=8, attn_r=4, lora_dropout=0.05, z_loss_coef=0.0)
    model = moetune.get_moe_model(tiny_model(family), moetune.MoEConfig(**(cfg | overrides)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / p.shape[-1] ** 0.5)
    return model.eval()


# ---- (1) MixLoRA -> moetune, against the mixlora package ---------------------------------------------
@pytest.mark.parametrize(
    "family, attention, extra",
    [("llama", True, {}), ("qwen2", True, {}), ("phi3", True, {}), ("qwen2", False, {"use_rslora": True})],
)
def test_mixlora_adapter_converts_to_equal_logits(tmp_path, family, attention, extra):
    cfg = package_config(mixlora_config(family, attention=attention, **extra))
    weights = random_mixlora_weights(family, cfg.export())
    src = write_mixlora(tmp_path / "mix", cfg.export(), weights)  # the package's own config export
    batch = tiny_batch(family)
    expected = logits(mixlora_model(family, cfg, weights), batch)

    moe_cfg = mixlora.from_mixlora(src, tmp_path / "moe")
    got = logits(moetune.MoEModel.from_pretrained(tiny_model(family), tmp_path / "moe"), batch)
    base = logits(tiny_model(family), batch)
    assert (expected - base).abs().max() > 0.05  # the adapter does change the outputs
    assert (got - expected).abs().max() < TOL
    assert (moe_cfg.expert_type, moe_cfg.router, moe_cfg.num_experts, moe_cfg.top_k) == ("ffn", "topk", 4, 2)
    assert moe_cfg.target_modules == MLP[family] and moe_cfg.use_rslora == bool(extra.get("use_rslora"))
    assert moe_cfg.attn_r == (4 if attention else 0)


def test_import_without_base_writes_save_pretrained_files_without_fingerprint(tmp_path):
    cfg = mixlora_config("llama")
    src = write_mixlora(tmp_path / "mix", cfg, random_mixlora_weights("llama", cfg))
    mixlora.from_mixlora(src, tmp_path / "moe")
    assert sorted(os.listdir(tmp_path / "moe")) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert sorted(os.listdir(tmp_path)) == ["mix", "moe"]  # no temporary directory left
    read_weights(str(tmp_path / "moe" / WEIGHTS_NAME))  # checksums verify
    record = json.loads((tmp_path / "moe" / CONFIG_NAME).read_text())
    assert record["_base_model"] == "tiny-llama" and "_base_fingerprint" not in record
    assert record["aux_loss_coef"] == pytest.approx(0.001 * 2)  # Mixtral loss = top_k x moetune's
    assert record["z_loss_coef"] == 0.0
    with pytest.raises(BaseMismatchError, match="no base-model fingerprint"):
        moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path / "moe", strict=True)
    # the same adapter built on a base: identical tensors, plus the base's fingerprint
    base = tiny_model("llama")
    before = {
        n: (type(m), [p.requires_grad for p in m.parameters(recurse=False)]) for n, m in base.named_modules()
    }
    mixlora.from_mixlora(src, tmp_path / "moe-base", base=base)
    after = {
        n: (type(m), [p.requires_grad for p in m.parameters(recurse=False)]) for n, m in base.named_modules()
    }
    assert after == before  # the base is left as it was: modules and requires_grad flags
    a, b = load_file(tmp_path / "moe" / WEIGHTS_NAME), load_file(tmp_path / "moe-base" / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path / "moe-base", strict=True)


def test_import_folds_a_different_attention_scaling_into_b(tmp_path):
    """MoE-PEFT's expert_lora: experts r=4 alpha=8, attention (top level) r=4 alpha=4; moetune scales
    attention by the experts' alpha / attn_r, so the import folds 4/8 into the attention B."""
    cfg = mixlora_config("llama", lora_alpha=4, expert_lora={"r": 4, "lora_alpha": 8})
    weights = random_mixlora_weights("llama", cfg)
    src = write_mixlora(tmp_path / "mix", cfg, weights)
    reference = package_config(mixlora_config("llama"))  # alpha 8 everywhere, attention B halved instead
    halved = {
        k: v / 2 if ".self_attn." in k and k.endswith("lora_B.weight") else v for k, v in weights.items()
    }
    batch = tiny_batch("llama")
    expected = logits(mixlora_model("llama", reference, halved), batch)
    mixlora.from_mixlora(src, tmp_path / "moe")
    got = logits(moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path / "moe"), batch)
    assert (got - expected).abs().max() < TOL


# ---- (2) moetune -> MixLoRA, loaded by the mixlora package -----------------------------------------------
@pytest.mark.parametrize(
    "family, overrides", [("llama", {}), ("qwen2", {"use_rslora": True, "attn_r": 0}), ("phi3", {})]
)
def test_moetune_adapter_exports_to_equal_logits_in_mixlora(tmp_path, family, overrides):
    model = random_moetune(family, **overrides)
    batch = tiny_batch(family)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "moe")
    data = mixlora.to_mixlora(tmp_path / "moe", tmp_path / "mix", base=tiny_model(family))
    assert data["act_fn"] == "silu" and data["routing_strategy"] == "mixlora"
    config, weights = load_adapter_weights(str(tmp_path / "mix"), device="cpu")  # the package's loader
    got = logits(mixlora_model(family, config, weights), batch)
    assert (expected - logits(tiny_model(family), batch)).abs().max() > 0.05
    assert (got - expected).abs().max() < TOL


# ---- (3) round trips -------------------------------------------------------------------------------------
def test_round_trip_moetune_mixlora_moetune_is_bitwise(tmp_path):
    model = random_moetune(
        "llama", r=4, attn_r=2, use_rslora=True, lora_alpha=8, router_jitter=0.1, aux_loss_coef=0.02
    )
    model.save_pretrained(tmp_path / "a")
    with pytest.warns(UserWarning, match="ignores expert_lora"):  # attention rank 2 != expert rank 4
        data = mixlora.to_mixlora(tmp_path / "a", tmp_path / "mix", act_fn="silu")
    assert data["r"] == 2 and data["expert_lora"] == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05}
    back = mixlora.from_mixlora(tmp_path / "mix", tmp_path / "b")
    a, b = load_file(tmp_path / "a" / WEIGHTS_NAME), load_file(tmp_path / "b" / WEIGHTS_NAME)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    fields = ["num_experts", "top_k", "r", "lora_alpha", "lora_dropout", "use_rslora", "attn_r"]
    fields += ["router_jitter", "aux_loss_coef", "expert_type", "router"]
    assert {f: getattr(back, f) for f in fields} == {f: getattr(model.moe_config, f) for f in fields}
    assert back.target_modules == ["gate_proj", "up_proj", "down_proj"]  # None (the default) named
    assert sorted(back.attn_target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    batch = tiny_batch("llama")
    reloaded = moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path / "b")
    assert torch.equal(logits(reloaded, batch), logits(model, batch))


def test_round_trip_mixlora_moetune_mixlora_is_bitwise(tmp_path):
    cfg = mixlora_config("qwen2", jitter_noise=0.05, router_aux_loss_coef=0.01)
    weights = random_mixlora_weights("qwen2", cfg)
    mixlora.from_mixlora(write_mixlora(tmp_path / "mix", cfg, weights), tmp_path / "moe")
    with pytest.warns(UserWarning, match="jitter_noise at inference"):
        data = mixlora.to_mixlora(tmp_path / "moe", tmp_path / "mix2", act_fn="silu")
    again = torch.load(tmp_path / "mix2" / mixlora.MIXLORA_WEIGHTS, weights_only=True)
    assert sorted(again) == sorted(weights)
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    for key in (
        "r",
        "lora_alpha",
        "num_experts",
        "top_k",
        "act_fn",
        "jitter_noise",
        "base_model_name_or_path",
    ):
        assert data[key] == cfg[key], key
    assert data["router_aux_loss_coef"] == pytest.approx(0.01)
    assert sorted(data["target_modules"]) == sorted(cfg["target_modules"])


# ---- (4) refusals ------------------------------------------------------------------------------------------
EXPORT_REFUSALS = [
    ({"router": "topp"}, "router='topp'"),
    ({"num_shared_experts": 1}, "num_shared_experts=1"),
    ({"num_experts": [2, 3]}, "per-layer expert counts"),
    ({"expert_type": "linear", "attn_r": 0}, "expert_type='linear'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"router_dtype": "float64"}, "router_dtype='float64'"),
    ({"lora_alpha": 12.5}, "integer lora_alpha"),
    ({"attn_target_modules": r"model\.layers\.0\.self_attn\.q_proj"}, "same projections in every layer"),
]


@pytest.mark.parametrize("overrides, reason", EXPORT_REFUSALS, ids=[r for _, r in EXPORT_REFUSALS])
def test_export_refuses_what_mixlora_cannot_hold(tmp_path, overrides, reason):
    random_moetune("llama", **overrides).save_pretrained(tmp_path / "moe")
    with pytest.raises(mixlora.ConversionError, match=reason):
        mixlora.to_mixlora(tmp_path / "moe", tmp_path / "mix", act_fn="silu")
    assert not (tmp_path / "mix").exists()


def test_export_refuses_a_nonzero_expert_bias_task_blocks_and_unnamed_targets(tmp_path):
    model = random_moetune("llama", bias_update_rate=0.01)
    model.save_pretrained(tmp_path / "zero-bias")  # bias balancing on, bias still 0: exportable
    with pytest.warns(UserWarning, match="bias_update_rate"):
        mixlora.to_mixlora(tmp_path / "zero-bias", tmp_path / "mix0", act_fn="silu")
    with torch.no_grad():
        next(layer for _, layer in model.moe_layers()).router.expert_bias[1] = 0.25
    model.save_pretrained(tmp_path / "bias")
    model = random_moetune("llama")
    model.add_experts(2, task="B")
    model.save_pretrained(tmp_path / "tasks")
    random_moetune("gpt2", attn_r=0).save_pretrained(tmp_path / "gpt2")  # transformer.h.{i}.mlp.c_fc
    for name, reason in [
        ("bias", "expert bias of layer 0 is nonzero"),
        ("tasks", "2 task blocks"),
        ("gpt2", "has no MixLoRA counterpart"),
    ]:
        with pytest.raises(mixlora.ConversionError, match=reason):
            mixlora.to_mixlora(tmp_path / name, tmp_path / f"mix-{name}", act_fn="silu")
        assert not (tmp_path / f"mix-{name}").exists()


def test_export_needs_the_activation(tmp_path):
    random_moetune("llama").save_pretrained(tmp_path / "moe")  # a base built from a config: no name
    with pytest.raises(mixlora.ConversionError, match="records no base model.*act_fn"):
        mixlora.to_mixlora(tmp_path / "moe", tmp_path / "mix")
    with pytest.raises(mixlora.ConversionError, match="act_fn='swiglu'"):
        mixlora.to_mixlora(tmp_path / "moe", tmp_path / "mix", act_fn="swiglu")
    base_dir = tmp_path / "base"
    tiny_model("llama").config.save_pretrained(base_dir)  # a model directory's config is enough
    assert mixlora.to_mixlora(tmp_path / "moe", tmp_path / "mix", base=base_dir)["act_fn"] == "silu"


IMPORT_REFUSALS = [  # (config change, (tensor to add with its shape, or to remove), reason)
    ({"routing_strategy": "mixlora-dynamic"}, None, "routing_strategy='mixlora-dynamic'"),
    ({"peft_type": "LORA"}, None, "peft_type='LORA'"),
    ({"use_dora": True}, None, "DoRA"),
    ({"expert_lora": {"use_dora": True}}, None, "expert_lora.use_dora"),
    ({"bias": "all"}, None, "bias='all'"),
    ({"top_k": 5}, None, "top_k=5"),
    ({}, ("0.mlp.router.weight", (4, 32)), "not a MixLoRA tensor"),
    ({}, ("1.mlp.up_proj.experts.3.lora_B.weight", None), "experts.3.lora_B.weight is missing"),
    ({}, ("1.mlp.moe_gate.weight", (3, 32)), "moe_gate.weight has shape"),
    ({}, ("0.mlp.up_proj.experts.4.lora_A.weight", (4, 32)), "expert 4 lie outside"),
    (
        {"target_modules": [*ATTN["llama"], *MLP["llama"], "fc1"]},
        ("0.mlp.fc1.experts.0.lora_A.weight", (4, 32)),
        "fc1",
    ),
]


@pytest.mark.parametrize("change, damage, reason", IMPORT_REFUSALS, ids=[r for *_, r in IMPORT_REFUSALS])
def test_import_refuses_what_moetune_cannot_compute_alike(tmp_path, change, damage, reason):
    cfg = mixlora_config("llama") | change
    weights = random_mixlora_weights("llama", mixlora_config("llama"))
    if damage is not None:
        name, shape = "mixlora.layers." + damage[0], damage[1]
        if shape is None:
            del weights[name]
        else:
            weights[name] = torch.ones(shape)
    src = write_mixlora(tmp_path / "mix", cfg, weights)
    with pytest.raises(mixlora.ConversionError, match=reason):
        mixlora.from_mixlora(src, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


def test_import_checks_act_fn_and_unreadable_files_against_a_base(tmp_path):
    cfg = mixlora_config("llama", act_fn="gelu")
    src = write_mixlora(tmp_path / "mix", cfg, random_mixlora_weights("llama", cfg))
    mixlora.from_mixlora(src, tmp_path / "trusted")  # without a base, act_fn cannot be checked
    base = tiny_model("llama")
    with pytest.raises(mixlora.ConversionError, match="act_fn='gelu' differs.*'silu'"):
        mixlora.from_mixlora(src, tmp_path / "moe", base=base)
    (tmp_path / "mix" / mixlora.MIXLORA_WEIGHTS).write_bytes(b"not a pickle")
    with pytest.raises(mixlora.ConversionError, match="adapter_model.bin: not a readable tensor file"):
        mixlora.from_mixlora(src, tmp_path / "moe")


def test_a_safetensors_mixlora_file_is_read_too(tmp_path):
    from safetensors.torch import save_file

    cfg = mixlora_config("llama")
    weights = random_mixlora_weights("llama", cfg)
    write_mixlora(tmp_path / "bin", cfg, weights)
    os.makedirs(tmp_path / "st")
    (tmp_path / "st" / mixlora.MIXLORA_CONFIG).write_text(json.dumps(cfg))
    save_file(weights, tmp_path / "st" / mixlora.MIXLORA_SAFETENSORS)
    mixlora.from_mixlora(tmp_path / "bin", tmp_path / "a")
    mixlora.from_mixlora(tmp_path / "st", tmp_path / "b")
    a, b = load_file(tmp_path / "a" / WEIGHTS_NAME), load_file(tmp_path / "b" / WEIGHTS_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- CLI ---------------------------------------------------------------------------------------------------
def test_cli_convert_both_ways_and_one_line_errors(tmp_path, capsys):
    cfg = mixlora_config("llama")
    src = write_mixlora(tmp_path / "mix", cfg, random_mixlora_weights("llama", cfg))
    dst = str(tmp_path / "moe")
    assert main(["convert", "--from", "mixlora", src, dst]) == 0
    capsys.readouterr()
    assert main(["convert", "--from", "mixlora", src, dst]) == 2  # not into an existing one unasked
    err = capsys.readouterr().err.strip()
    assert err == f"moetune convert: error: {dst}: exists and is not empty; pass --overwrite to replace it"
    assert main(["convert", "--from", "mixlora", src, dst, "--overwrite"]) == 0
    moetune.MoEModel.from_pretrained(tiny_model("llama"), dst)
    assert main(["convert", "--to", "mixlora", dst, str(tmp_path / "mix2"), "--act-fn", "silu"]) == 0
    assert sorted(os.listdir(tmp_path / "mix2")) == [mixlora.MIXLORA_CONFIG, mixlora.MIXLORA_WEIGHTS]
    capsys.readouterr()

    random_moetune("llama", router="soft", aux_loss_coef=0.0).save_pretrained(tmp_path / "soft")
    for argv, needle in [
        (["--from", "mixlora", str(tmp_path / "none"), str(tmp_path / "y")], "none: no such MixLoRA adapter"),
        (
            ["--to", "mixlora", str(tmp_path / "soft"), str(tmp_path / "x"), "--act-fn", "silu"],
            "router='soft'",
        ),
        (["--from", "mixlora", src, str(tmp_path / "y"), "--act-fn", "silu"], "--act-fn goes with --to"),
        (["--to", "mixlora", dst, str(tmp_path / "x"), "--act-fn", "nope"], "act_fn='nope'"),
    ]:
        assert main(["convert", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("moetune convert: error:") and needle in err
