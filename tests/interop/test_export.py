"""Export to transformers MoE checkpoints (moetune.interop.export): logits of the loaded checkpoint
against the moetune model, every refusal, and the `moetune export` command."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open

import moetune
from moetune.app.cli import main
from moetune.interop.export import ExportError, export_mixtral, export_moe, merge_lora
from tests.helpers import tiny_models

tiny_batch, tiny_chat_tokenizer = tiny_models.tiny_batch, tiny_models.tiny_chat_tokenizer

LAYERS = 3


def tiny_base(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A 3-layer random causal LM (the shared tiny models have 2 layers), eval mode, eager attention."""
    common = dict(tiny_models._COMMON, num_hidden_layers=LAYERS, num_key_value_heads=tiny_models.KV_HEADS)
    if family in ("llama", "mistral"):
        common["head_dim"] = tiny_models.HEAD_DIM
    common.update(overrides)
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma"}[family]
    config = getattr(transformers, f"{name}Config")(**common)
    cls = getattr(transformers, f"{name}ForCausalLM")
    torch.manual_seed(seed)
    model = cls(config)
    model.set_attn_implementation("eager")
    return model.eval()


def randomize(model: moetune.MoEModel, seed: int = 1) -> moetune.MoEModel:
    """Every adapter weight random and nonzero (B is zero at init), routers spread over the experts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts." in name or "lora." in name or "router." in name or "trained." in name:
                scale = 1.0 if "router." in name else 0.03
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model.eval()


def inputs(seq: int = 10, seed: int = 3) -> dict[str, torch.Tensor]:
    batch = tiny_batch("llama", batch=3, seq=seq, seed=seed)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch).logits
    mask = batch["attention_mask"].bool()
    return out[mask]  # real tokens (padding rows are garbage in both, but need not be equal)


def load(path, cls=transformers.MixtralForCausalLM):
    return cls.from_pretrained(path).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_equal(model: moetune.MoEModel, exported, batch=None) -> float:
    """The exported checkpoint's logits equal the moetune model's; and the adapter really changes them."""
    batch = batch or inputs()
    ours, theirs = logits(model, batch), logits(exported, batch)
    with model.disable_adapter():
        base = logits(model, batch)
    diff = max_diff(ours, theirs)
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
    print(
        f"{test}: max |logit difference| {diff:.3g} (the adapter changes them by {max_diff(ours, base):.3g})"
    )
    torch.testing.assert_close(theirs, ours)  # float32 tolerance: atol 1e-5, rtol 1.3e-6
    assert max_diff(ours, base) > 1e-2  # not vacuous: 1000x the tolerance; the merged experts matter
    return diff


# ---------------------------------------------------------------------------------------- Mixtral


def test_llama_to_mixtral_equal_logits(tmp_path):
    base = tiny_base(
        "llama",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    cfg = moetune.MoEConfig(num_experts=4, top_k=2, r=4, attn_r=4, bias_update_rate=0.01)  # bias still 0
    model = randomize(moetune.get_moe_model(base, cfg))
    out = export_mixtral(model, tmp_path / "mixtral")
    exported = load(out)
    assert exported.config.num_local_experts == 4 and exported.config.num_experts_per_tok == 2
    assert exported.config.rope_parameters["rope_type"] == "llama3"
    model.reset_routing_stats()
    check_equal(model, exported)
    for layer, stats in model.routing_stats().items():  # the routers really spread the tokens
        assert sum(n > 0 for n in stats["tokens_per_expert"]) == 4, (layer, stats["tokens_per_expert"])
    # save_pretrained writes the original Mixtral layout that other servers read
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert "model.layers.2.block_sparse_moe.experts.3.w1.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    # expert 1 of layer 0: W + s B_1 A_1 on each projection, by hand
    layer = model.base_model.model.layers[0].mlp
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as fh:
        w2 = fh.get_tensor("model.layers.0.block_sparse_moe.experts.1.w2.weight")
    bank = layer.experts["down_proj"]
    by_hand = layer.base_layer.down_proj.weight + bank.scaling * bank.lora_B[0][1] @ bank.lora_A[0][1]
    assert max_diff(w2, by_hand) < 1e-6


def test_mistral_to_mixtral_sliding_window_tied_partial_targets(tmp_path):
    base = tiny_base("mistral", sliding_window=4, tie_word_embeddings=True)
    cfg = moetune.MoEConfig(
        num_experts=[4, 4, 4], top_k=2, r=4, attn_r=2, target_modules=["gate_proj", "down_proj"]
    )
    model = randomize(moetune.get_moe_model(base, cfg))
    exported = load(export_mixtral(model, tmp_path / "mixtral"))
    assert exported.config.sliding_window == 4 and exported.config.tie_word_embeddings
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    up = exported.model.layers[1].mlp.experts.gate_up_proj[:, 64:]  # untargeted up_proj: the base's in all
    assert torch.equal(up, base.model.layers[1].mlp.base_layer.up_proj.weight.expand(4, -1, -1))
    check_equal(model, exported, inputs(seq=12))  # longer than the window


def test_modules_to_save_unties_a_tied_head(tmp_path):
    base = tiny_base("mistral", tie_word_embeddings=True)
    cfg = moetune.MoEConfig(num_experts=4, top_k=2, r=4, modules_to_save=["lm_head"])
    model = randomize(moetune.get_moe_model(base, cfg))
    exported = load(export_mixtral(model, tmp_path / "mixtral"))
    assert not exported.config.tie_word_embeddings
    assert torch.equal(exported.lm_head.weight, model.base_model.lm_head.trained.weight)
    assert torch.equal(exported.model.embed_tokens.weight, base.model.embed_tokens.weight)
    check_equal(model, exported)


def test_added_task_experts_are_concatenated(tmp_path):
    cfg = moetune.MoEConfig(num_experts=4, top_k=2, r=4, attn_r=4, task="A", extra_tasks=["X"])
    model = randomize(moetune.get_moe_model(tiny_base("llama"), cfg))
    model.add_experts(2, task="B")
    randomize(model, seed=2)
    every = load(export_mixtral(model, tmp_path / "all"))
    assert every.config.num_local_experts == 6
    check_equal(model, every)  # routing among all 6 experts, as moetune without task restriction
    only_a = load(export_mixtral(model, tmp_path / "a", tasks=["A"]))
    only_b = load(export_mixtral(model, tmp_path / "b", tasks="B"))
    assert (only_a.config.num_local_experts, only_b.config.num_local_experts) == (4, 2)
    batch = inputs()
    only_x = load(export_mixtral(model, tmp_path / "x", tasks=["X"]))  # owns no experts: routes among all
    assert only_x.config.num_local_experts == 6
    for task, exported in (("A", only_a), ("B", only_b), ("X", only_x)):
        with model.use_tasks([task]):
            torch.testing.assert_close(logits(exported, batch), logits(model, batch))
    with pytest.raises(ExportError, match="unknown task 'C'"):
        export_mixtral(model, tmp_path / "c", tasks=["A", "C"])


def test_bf16_export_rounds_the_float32_export_once(tmp_path):
    """A bf16 base: the float32 export is exact (moetune over the same base upcast); the bf16 export is that
    checkpoint rounded to bf16 once, tensor by tensor, so it carries the rounding of every merged weight
    (as any merged bf16 checkpoint) and bf16 router logits (module docstring): measured, not exact."""
    base = tiny_base("llama").to(torch.bfloat16)
    model = randomize(moetune.get_moe_model(base, moetune.MoEConfig(num_experts=4, top_k=2, r=4, attn_r=4)))
    batch = inputs()
    truth = logits(copy.deepcopy(model).float(), batch)  # the same weights, computed in float32
    as_fp32 = load(export_mixtral(model, tmp_path / "fp32", dtype="float32"))
    assert as_fp32.dtype == torch.float32
    torch.testing.assert_close(logits(as_fp32, batch), truth)

    out = export_mixtral(model, tmp_path / "bf16")  # the base's dtype
    exported = transformers.MixtralForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert exported.dtype == torch.bfloat16
    fp32_state = as_fp32.state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, fp32_state[name].to(torch.bfloat16)), name
    ours, theirs = logits(model, batch).float(), logits(exported, batch).float()
    err_ours, err_export = max_diff(ours, truth), max_diff(theirs, truth)
    agree = (theirs.argmax(-1) == truth.argmax(-1)).float().mean().item()
    agree_ours = (ours.argmax(-1) == truth.argmax(-1)).float().mean().item()
    scale = truth.abs().max().item()
    print(f"bf16 vs float32: moetune {err_ours:.3g}, export {err_export:.3g} (max |logit| {scale:.3g})")
    print(f"same argmax as float32 on: bf16 export {agree:.3f}, moetune bf16 {agree_ours:.3f} of the tokens")
    assert err_export < 0.25 * scale  # a wrong expert or router would be far off


def test_merge_lora_conv1d_is_transposed():
    A, B, W = torch.randn(2, 5), torch.randn(3, 2), torch.randn(3, 5)
    merged = merge_lora(W, A, B, 0.5)
    assert merged.dtype == torch.float64  # rounded once, by the caller
    torch.testing.assert_close(merged.float(), W + 0.5 * B @ A)
    torch.testing.assert_close(merge_lora(W.T, A, B, 0.5, fan_in_fan_out=True).float(), (W + 0.5 * B @ A).T)
    assert merge_lora(W.bfloat16(), A, B, 0.5).dtype == torch.float32


# ---------------------------------------------------------------------------------------- Qwen2-MoE


def test_qwen2_to_qwen2_moe_equal_logits(tmp_path):
    base = tiny_base("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert "sliding_attention" in base.config.layer_types
    cfg = moetune.MoEConfig(num_experts=4, top_k=2, r=4, attn_r=4)
    model = randomize(moetune.get_moe_model(base, cfg))
    with torch.no_grad():  # Qwen2's q/k/v biases are random too (carried over as they are)
        for layer in base.model.layers:
            layer.self_attn.q_proj.base_layer.bias.normal_()
    exported = load(export_moe(model, tmp_path / "qwen2moe", "qwen2_moe"), transformers.Qwen2MoeForCausalLM)
    assert exported.config.norm_topk_prob and exported.config.num_experts == 4
    assert not exported.model.layers[0].mlp.shared_expert_gate.weight.any()  # adds exactly 0
    check_equal(model, exported, inputs(seq=12))
    with pytest.raises(ExportError, match="use --to qwen2_moe"):
        export_mixtral(model, tmp_path / "mixtral")


# ---------------------------------------------------------------------------------------- refusals


REFUSED_CONFIGS = [
    (dict(router="soft", aux_loss_coef=0.0), "router='soft'"),
    (dict(router="topp"), "router='topp'"),
    (dict(router="switch"), "router='switch'"),
    (dict(router="threshold"), "router='threshold'"),
    (dict(num_shared_experts=1), "num_shared_experts=1"),
    (dict(num_experts=[4, 2, 4]), r"expert counts differ between layers \(\[2, 4\]"),
    (dict(expert_type="linear"), "expert_type='linear'"),
    (dict(task_routing="token+task"), "task_routing='token\\+task'"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED_CONFIGS)
def test_refused_configs(tmp_path, overrides, message):
    cfg = moetune.MoEConfig(**{"num_experts": 4, "top_k": 2, "r": 4, **overrides})
    model = moetune.get_moe_model(tiny_base("llama"), cfg)
    with pytest.raises(ExportError, match=message):
        export_mixtral(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []  # nothing written, no temporary directory left


def test_refused_nonzero_expert_bias(tmp_path):
    cfg = moetune.MoEConfig(num_experts=4, top_k=2, r=4, bias_update_rate=0.01)
    model = moetune.get_moe_model(tiny_base("llama"), cfg)
    model.base_model.model.layers[1].mlp.router.expert_bias[2] = 0.01
    with pytest.raises(ExportError, match=r"layers\.1\.mlp: nonzero expert bias"):
        export_mixtral(model, tmp_path / "out")


def test_cli_refuses_a_nonzero_expert_bias_before_loading_the_base(tmp_path, capsys, monkeypatch):
    """From the adapter's files alone, naming the fix; the base (a directory that does not exist) is
    never loaded."""
    from moetune.app import demo
    from moetune.app.cli import main

    cfg = moetune.MoEConfig(num_experts=4, top_k=2, r=4, bias_update_rate=0.01)
    model = moetune.get_moe_model(tiny_base("llama"), cfg)
    model.base_model.model.layers[1].mlp.router.expert_bias[2] = 0.01
    model.save_pretrained(tmp_path / "adapter")
    monkeypatch.setattr(demo, "load_model", lambda *a: pytest.fail("the base was loaded"))
    argv = [
        "export",
        "--adapter",
        str(tmp_path / "adapter"),
        "--base",
        str(tmp_path / "none"),
        str(tmp_path / "x"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moetune export: error: ") and len(err.splitlines()) == 1
    assert "nonzero expert bias" in err and "train with --bias-update-rate 0" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("family", "overrides", "message"),
    [
        ("llama", dict(attention_bias=True), "attention_bias=True"),
        ("llama", dict(mlp_bias=True), "mlp_bias=True"),
        ("gemma", dict(head_dim=8), r"model_type='gemma'.*llama or mistral"),
    ],
)
def test_refused_bases(tmp_path, family, overrides, message):
    model = moetune.get_moe_model(tiny_base(family, **overrides), moetune.MoEConfig(num_experts=4, r=4))
    with pytest.raises(ExportError, match=message):
        export_mixtral(model, tmp_path / "out")


def test_existing_directory_refused_unless_overwrite(tmp_path):
    model = randomize(moetune.get_moe_model(tiny_base("llama"), moetune.MoEConfig(num_experts=4, r=4)))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_mixtral(model, tmp_path / "out")
    export_mixtral(model, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "old.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the old one and the temporary one are gone
    check_equal(model, load(tmp_path / "out"))


# ---------------------------------------------------------------------------------------- CLI


def test_cli_export_finds_the_base_and_copies_the_tokenizer(tmp_path, capsys):
    base_dir, adapter, dst = tmp_path / "base", tmp_path / "adapter", tmp_path / "served"
    tiny_base("llama").save_pretrained(base_dir)
    tiny_chat_tokenizer().save_pretrained(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()  # records its path
    model = randomize(moetune.get_moe_model(base, moetune.MoEConfig(num_experts=4, top_k=2, r=4, attn_r=4)))
    model.save_pretrained(adapter)

    # no --base: the base comes from the adapter's provenance, as for `moetune generate`
    assert main(["export", "--to", "mixtral", "--adapter", str(adapter), str(dst)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        os.listdir(dst)
    )
    assert json.loads((dst / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    check_equal(model, load(dst))
    assert transformers.AutoTokenizer.from_pretrained(dst)("hi there")["input_ids"] == [6, 7]

    soft = moetune.get_moe_model(tiny_base("llama"), moetune.MoEConfig(router="soft", aux_loss_coef=0.0))
    soft.save_pretrained(tmp_path / "soft")
    code = main(["export", "--adapter", str(tmp_path / "soft"), "--base", str(base_dir), str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("moetune export: error: router='soft'")
