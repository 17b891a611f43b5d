"""Merging a MoE-LoRA adapter into the base weights (`MoEModel.merge_and_unload`, `moetune.core.merge`).

Where every layer's mixture is token-independent the merged plain model must give the MoE model's
logits (fp32 rounding apart, measured <= 3.1e-6); everywhere else the merge is refused naming the layer,
with the model left as it was.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import transformers

import moetune
from moetune import MoEConfig
from moetune.core.layers import LoRALinear, MoEFFN, MoELinear, TrainableCopy
from moetune.core.merge import MergeError, fixed_mixture
from tests.helpers.tiny_models import tiny_batch, tiny_model

WRAPPERS = (MoEFFN, MoELinear, LoRALinear, TrainableCopy)


def moe_model(family: str, seed: int = 0, **cfg) -> moetune.MoEModel:
    """A MoE model with random nonzero experts, LoRA and trained copies, in eval mode."""
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0) | cfg
    model = moetune.get_moe_model(tiny_model(family), MoEConfig(**cfg))
    randomize(model, seed)
    return model.eval()


def randomize(model: moetune.MoEModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "router" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "trained" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, family: str, padded: bool = True) -> torch.Tensor:
    batch = tiny_batch(family, padded=padded)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def assert_merges_exactly(model: moetune.MoEModel, family: str, padded: bool = True) -> torch.nn.Module:
    expected = logits(model, family, padded)
    with model.disable_adapter():
        effect = (expected - logits(model, family, padded)).abs().max().item()
    assert effect > 0.05  # the adapter changes the logits: equality below is not trivial
    merged = model.merge_and_unload()
    assert isinstance(merged, transformers.PreTrainedModel)
    assert not any(isinstance(m, WRAPPERS) for m in merged.modules())
    diff = (logits(merged, family, padded) - expected).abs().max().item()
    assert diff <= 1e-5, f"merged vs MoE: max |logit difference| {diff:.3g} (adapter effect {effect:.3g})"
    return merged


# experts with a token-independent mixture: one routed expert; linear experts may add shared ones
MERGEABLE = {
    "llama-ffn": ("llama", dict(num_experts=1, top_k=1, attn_r=4, modules_to_save=["lm_head"])),
    "llama-linear-shared": (
        "llama",
        dict(expert_type="linear", num_experts=1, top_k=1, num_shared_experts=2, attn_r=4),
    ),
    "gpt2-ffn": ("gpt2", dict(num_experts=1, top_k=1, attn_r=4, modules_to_save=["lm_head"])),
    "gpt2-linear-shared": (
        "gpt2",
        dict(
            expert_type="linear",
            router="soft",
            aux_loss_coef=0.0,
            num_experts=1,
            num_shared_experts=1,
            attn_r=4,
        ),
    ),
    # ffn experts on the output projection alone: FFN_i - FFN is linear in them, shared experts merge
    "llama-ffn-down-only-shared": (
        "llama",
        dict(num_experts=1, top_k=1, target_modules=["down_proj"], num_shared_experts=2, attn_r=4),
    ),
    "llama-ffn-switch-cf1": ("llama", dict(router="switch", num_experts=1, capacity_factor=1.0)),
    "llama-ffn-threshold": ("llama", dict(router="threshold", num_experts=1, threshold_max=0.5)),
    "llama-ffn-topp": ("llama", dict(router="topp", num_experts=1)),
}


@pytest.mark.parametrize("case", list(MERGEABLE))
def test_merged_model_equals_moe_model(case):
    family, cfg = MERGEABLE[case]
    # switch routes no padding token (its output is unused): compared on an unpadded batch
    assert_merges_exactly(moe_model(family, **cfg), family, padded=cfg.get("router") != "switch")


def test_switch_merge_differs_on_padding_only():
    model = moe_model("llama", router="switch", num_experts=1, capacity_factor=1.0)
    expected = logits(model, "llama")
    merged = model.merge_and_unload()
    real = tiny_batch("llama")["attention_mask"].bool()
    assert (logits(merged, "llama") - expected)[real].abs().max().item() <= 1e-5


def test_merged_model_saves_and_reloads(tmp_path):
    model = moe_model("gpt2", num_experts=1, top_k=1, attn_r=4, modules_to_save=["lm_head"])
    expected = logits(model, "gpt2")
    merged = model.merge_and_unload()
    assert not merged.config.tie_word_embeddings  # lm_head is the trained copy, no longer the embedding
    merged.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert (logits(reloaded.eval(), "gpt2") - expected).abs().max().item() <= 1e-5


def test_merge_a_task_that_owns_one_expert():
    model = moe_model("llama", num_experts=2, top_k=2, attn_r=4)
    model.add_experts(1, task="B")
    randomize(model, seed=1)
    with pytest.raises(MergeError, match=r"model\.layers\.0\.mlp: the router \('topk'\) chooses among 3"):
        model.merge_and_unload()
    with model.use_tasks(["default"]), pytest.raises(MergeError, match="among 2 routed experts"):
        model.merge_and_unload()
    with model.use_tasks(["B"]):
        expected = logits(model, "llama")
    merged = model.merge_and_unload(task="B")
    assert (logits(merged, "llama") - expected).abs().max().item() <= 1e-5


def test_merge_under_use_tasks():
    model = moe_model("gpt2", expert_type="linear", num_experts=3, top_k=1, num_shared_experts=1)
    model.add_experts(1, task="B")
    randomize(model, seed=2)
    with model.use_tasks("B"):
        expected = logits(model, "gpt2")
        merged = model.merge_and_unload()
    assert (logits(merged, "gpt2") - expected).abs().max().item() <= 1e-5


def test_ffn_shared_experts_merge_only_when_untrained():
    trained = moe_model("llama", num_experts=1, top_k=1, num_shared_experts=1)
    before = logits(trained, "llama")
    with pytest.raises(MergeError, match=r"model\.layers\.0\.mlp: expert_type='ffn' mixes 2 experts"):
        trained.merge_and_unload()
    assert sum(isinstance(m, MoEFFN) for m in trained.modules()) == 2  # nothing changed
    assert torch.equal(logits(trained, "llama"), before)

    fresh_shared = moe_model("llama", num_experts=1, top_k=1, num_shared_experts=1)
    with torch.no_grad():
        for _, layer in fresh_shared.moe_layers():
            for bank in layer.experts.values():
                bank.lora_B[0][1:].zero_()  # the shared expert adds nothing
    assert_merges_exactly(fresh_shared, "llama")


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(num_experts=2, top_k=2), r"model\.layers\.0\.mlp: the router \('topk'\) chooses among 2"),
        (dict(expert_type="linear", num_experts=2, top_k=1), r"model\.layers\.0\.mlp\.gate_proj: the router"),
        (dict(router="switch", num_experts=1, capacity_factor=0.5), r"capacity_factor=0\.5 < 1"),
        (dict(router="threshold", num_experts=1), r"tau_max=1\.0 drops a token"),
    ],
)
def test_token_dependent_mixtures_are_refused(cfg, match):
    model = moe_model("llama", attn_r=4, **cfg)
    before = logits(model, "llama")
    with pytest.raises(MergeError, match=match):
        model.merge_and_unload()
    assert any(isinstance(m, LoRALinear) for m in model.modules())  # nothing merged, nothing unwrapped
    assert torch.equal(logits(model, "llama"), before)


def test_fixed_mixture_weights():
    model = moe_model("llama", expert_type="linear", num_experts=1, top_k=1, num_shared_experts=2)
    _, layer = next(model.moe_layers())
    assert torch.equal(fixed_mixture(layer, None), torch.ones(3))


@pytest.mark.parametrize(
    "family, targets",
    [("gpt2", ["c_fc", "mlp.c_proj", "c_attn", "attn.c_proj"]), ("llama", ["up_proj", "q_proj"])],
)
def test_upcycled_single_expert_merges_like_peft(tmp_path, family, targets):
    """peft's merge_and_unload and moetune's give the same weights (Conv1D orientation included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=family == "gpt2")
        reference = peft.get_peft_model(tiny_model(family), config)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    reference.save_pretrained(tmp_path)
    cfg = MoEConfig(num_experts=1, top_k=1, r=4, attn_r=4)
    merged = moetune.upcycle_lora(tiny_model(family), tmp_path, cfg).merge_and_unload()
    peft_merged = reference.merge_and_unload()
    ours, theirs = merged.state_dict(), peft_merged.state_dict()
    assert ours.keys() == theirs.keys()
    diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert diff <= 1e-6, f"weights differ from peft's merge by {diff:.3g}"


def test_task_routing_with_one_expert_merges():
    model = moe_model("llama", num_experts=1, top_k=1, task_routing="task", attn_r=4)
    with model.use_tasks("default"):
        expected = logits(model, "llama")
    merged = model.merge_and_unload(task="default")
    assert (logits(merged, "llama") - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("router", ["topk", "soft", "topp", "threshold"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_task_routing_mixture_of_linear_experts_merges(router: str, family: str) -> None:
    """MOELoRA: every token of a task gets the same mixture, so linear experts merge per task."""
    cfg = dict(
        expert_type="linear",
        num_experts=4,
        top_k=2,
        router=router,
        task_routing="task",
        task="A",
        extra_tasks=["B"],
        num_shared_experts=1,
        attn_r=4,
        aux_loss_coef=0.0 if router == "soft" else 0.01,
    )
    for task in ("A", "B"):
        model = moe_model(family, seed=1, **cfg)
        with model.use_tasks(task):
            expected = logits(model, family)
            with model.disable_adapter():
                assert (expected - logits(model, family)).abs().max().item() > 0.05
        other = "B" if task == "A" else "A"
        with model.use_tasks(other):
            assert not torch.allclose(expected, logits(model, family))  # tasks differ: a real check
        merged = model.merge_and_unload(task=task)
        diff = (logits(merged, family) - expected).abs().max().item()
        assert diff <= 1e-5, f"task {task}: merged vs MoE max |logit difference| {diff:.3g}"


def test_task_routing_merge_refusals() -> None:
    several = moe_model("llama", num_experts=2, top_k=2, task_routing="task")
    with pytest.raises(MergeError, match=r"model\.layers\.0\.mlp: expert_type='ffn' mixes 2 experts"):
        several.merge_and_unload(task="default")  # the activation makes a sum of FFNs no FFN
    linear = moe_model("llama", expert_type="linear", num_experts=2, top_k=2, task_routing="task")
    with pytest.raises(MergeError, match=r"task_routing='task' mixes the experts by task: name the task"):
        linear.merge_and_unload()
    token = moe_model("llama", expert_type="linear", num_experts=2, top_k=2, task_routing="token+task")
    with pytest.raises(MergeError, match=r"chooses among 2 routed experts per token"):
        token.merge_and_unload(task="default")
    switch = moe_model("llama", expert_type="linear", num_experts=2, router="switch", task_routing="task")
    with pytest.raises(MergeError, match=r"chooses among 2 routed experts per token"):
        switch.merge_and_unload(task="default")
