"""TRL's SFTTrainer with the moetune mixin: padded and packed padding-free batches, masks for statistics."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")  # an optional integration: installed by the test extra

import moetune  # noqa: E402
from moetune.serialization import adapter_state_dict  # noqa: E402
from moetune.training import MoETrainerMixin  # noqa: E402
from tests.tiny_models import tiny_chat_tokenizer, tiny_model  # noqa: E402


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
