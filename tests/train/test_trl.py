"""TRL with the moetune mixin: SFT (padded and packed batches, statistics masks), DPO (base as reference)."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from transformers import PreTrainedModel

trl = pytest.importorskip("trl")  # an optional integration: installed by the test extra

import moetune  # noqa: E402
from moetune.io.adapter import adapter_state_dict  # noqa: E402
from moetune.train.dpo import MoEDPOTrainer  # noqa: E402
from moetune.train.trainer import DisabledAdapterReference, MoETrainerMixin  # noqa: E402
from tests.helpers.tiny_models import tiny_chat_tokenizer, tiny_model  # noqa: E402


class MoESFTTrainer(MoETrainerMixin, trl.SFTTrainer):
    pass


def sft_trainer(tmp_path, packing: bool) -> MoESFTTrainer:
    from datasets import Dataset

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"what is {a} + {b} ?" + " hi" * (a % 4)},
                {"role": "assistant", "content": str(a + b)},
            ]
        }
        for a in range(10)
        for b in range(4)
    ]
    torch.manual_seed(0)
    model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(num_experts=4, lora_dropout=0.0))
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        packing=packing,
        padding_free=packing,
        max_length=64,
        logging_steps=1,
        disable_tqdm=True,
        learning_rate=1e-2,
    )
    return MoESFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_chat_tokenizer()
    )


@pytest.mark.parametrize("packing", [False, True])
def test_sft_trains_experts_and_logs_router_metrics(tmp_path, packing: bool) -> None:
    t = sft_trainer(tmp_path, packing)
    before = {k: v.clone() for k, v in adapter_state_dict(t.model).items()}
    t.train()
    after = adapter_state_dict(t.model)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert all("moe/aux_loss" in h for h in t.state.log_history if "loss" in h)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_batches_count_real_tokens_only(tmp_path, packing: bool) -> None:
    t = sft_trainer(tmp_path, packing)
    batch = next(iter(t.get_train_dataloader()))
    model = t.model.train()
    model.reset_routing_stats()
    t.compute_loss(model, dict(batch))
    layer = next(iter(model.routing_stats().values()))
    if packing:  # padding-free: one row of packed sequences with position_ids, every token real
        assert "attention_mask" not in batch and "position_ids" in batch
        assert layer["tokens"] == batch["input_ids"].numel()
    else:
        assert layer["tokens"] == int(batch["attention_mask"].sum()) < batch["input_ids"].numel()
    assert model.aux_losses()  # the balance losses were computed on this forward


# ---- DPO: the reference model is the policy with its adapter off ----------------------------------------
def preference_pairs():
    from datasets import Dataset

    def turn(role: str, text: str) -> list[dict[str, str]]:
        return [{"role": role, "content": text}]

    rows = [
        {
            "prompt": turn("user", f"what is {a} + {b} ?" + " hi" * (a % 3)),
            "chosen": turn("assistant", f"{a + b} good"),
            "rejected": turn("assistant", str(a * b + 1)),
        }
        for a in range(4)
        for b in range(4)
    ]
    return Dataset.from_list(rows)


def moe_llama(perturb: bool = False) -> moetune.MoEModel:
    model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(num_experts=4, lora_dropout=0.0))
    if perturb:  # B = 0 at initialisation: make the adapter change the outputs from the start
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 1.0)
    return model


def dpo_trainer(tmp_path, model: moetune.MoEModel, **overrides) -> MoEDPOTrainer:
    settings = dict(max_steps=2, learning_rate=1e-2, gradient_checkpointing=False) | overrides
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        disable_tqdm=True,
        **settings,
    )
    return MoEDPOTrainer(
        model=model, args=args, train_dataset=preference_pairs(), processing_class=tiny_chat_tokenizer()
    )


def base_logps(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion log-probs (B,) of chosen and rejected under a fresh copy of the frozen base (same seed)."""
    base = tiny_model("llama")
    ids, completion = batch["input_ids"], batch["completion_mask"]  # (2B, L): chosen rows, then rejected
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]  # (2B, L-1, V)
    token_logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (2B, L-1)
    return (token_logp * completion[:, 1:]).sum(1).chunk(2)


def pretrained_models_alive() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every object touches deprecated torch aliases
        warnings.simplefilter("ignore", FutureWarning)
        return sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_makes_no_copy_of_the_base(tmp_path, precompute: bool) -> None:
    model = moe_llama()
    alive = pretrained_models_alive()
    t = dpo_trainer(tmp_path, model, precompute_ref_log_probs=precompute)
    assert pretrained_models_alive() == alive  # TRL neither loaded nor copied a reference model
    if precompute:
        assert t.ref_model is None
    else:
        assert isinstance(t.ref_model, DisabledAdapterReference) and t.ref_model.policy is model
        assert list(t.ref_model.parameters()) == [] and t.ref_model.state_dict() == {}


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_reference_logps_are_the_frozen_base(tmp_path, precompute: bool) -> None:
    t = dpo_trainer(tmp_path, moe_llama(perturb=True), max_steps=1, precompute_ref_log_probs=precompute)
    t.train()
    batch = next(iter(t.get_train_dataloader()))
    assert ("ref_chosen_logps" in batch) == precompute
    t.compute_loss(t.model.train(), batch)
    metrics = t._metrics["train"]  # rewards = beta * (policy logps - reference logps), batch means
    base_chosen, base_rejected = base_logps(batch)
    for side, base in (("chosen", base_chosen), ("rejected", base_rejected)):
        policy = metrics[f"logps/{side}"][-1]
        reference = policy - metrics[f"rewards/{side}"][-1] / t.beta
        assert reference == pytest.approx(base.mean().item(), abs=1e-3)
        assert abs(policy - base.mean().item()) > 0.1  # the policy itself is not the base


def test_dpo_step_trains_the_adapter_keeps_the_base_and_adds_balance_losses(tmp_path) -> None:
    t = dpo_trainer(tmp_path, moe_llama())
    model = t.model
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    t.train()
    after = adapter_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all("moe/aux_loss" in h and "rewards/margins" in h for h in t.state.log_history if "loss" in h)

    # The balance losses are the policy forward's (with a graph), not the no-grad reference forward's.
    batch = next(iter(t.get_train_dataloader()))
    model.train().reset_routing_stats()
    loss = t.compute_loss(model, batch)
    tokens = next(iter(model.routing_stats().values()))["tokens"]
    assert tokens == int(batch["attention_mask"].sum())  # routed once: the reference pass has no experts
    assert model.aux_losses()["aux_loss"].requires_grad
    dpo_alone = trl.DPOTrainer.compute_loss(t, model, batch)
    balance = model.weighted_aux_loss()
    assert float(balance.detach()) > 0
    torch.testing.assert_close(loss - dpo_alone, balance)


def test_dpo_refuses_to_sync_a_reference_that_is_the_base(tmp_path) -> None:
    with pytest.raises(ValueError, match="sync_ref_model"):
        dpo_trainer(tmp_path, moe_llama(), sync_ref_model=True)


def test_dpo_with_trls_default_activation_checkpointing(tmp_path) -> None:
    """TRL's DPOConfig turns activation checkpointing on by default: the reference pass (adapter off,
    no autograd) runs between the policy's forward and its backward, and training logs the losses of a
    run without checkpointing."""
    defaults = trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert defaults.gradient_checkpointing
    logs = {}
    for checkpointing in (True, False):
        torch.manual_seed(0)
        t = dpo_trainer(
            tmp_path / str(checkpointing), moe_llama(perturb=True), gradient_checkpointing=checkpointing
        )
        t.train()
        logs[checkpointing] = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(logs[True]) == 2
    assert logs[True] == pytest.approx(logs[False], rel=1e-4)
