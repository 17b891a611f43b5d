"""Tiny MoE models and trainers the tests share: cached base builds, small configs, a MoETrainer."""

from __future__ import annotations

import copy
import functools

import torch
from datasets import Dataset
from transformers import TrainingArguments

import moetune
from moetune.io.adapter import adapter_state_dict
from moetune.train.trainer import MoETrainer
from tests.helpers.tiny_models import tiny_batch, tiny_model

ROUTERS = ["topk", "topp", "soft", "switch", "threshold"]  # every routing function


@functools.cache
def _pristine(family: str, dtype: torch.dtype = torch.float32):
    return tiny_model(family, dtype=dtype)


def fresh(family: str, dtype: torch.dtype = torch.float32):
    """`tiny_model(family)` (seed 0), copied from a cached build: building costs 30-100 ms, copying 5."""
    return copy.deepcopy(_pristine(family, dtype))


@functools.cache
def _base_logits(family: str) -> torch.Tensor:
    with torch.no_grad():
        return _pristine(family)(**inputs(tiny_batch(family))).logits


def base_logits(family: str) -> torch.Tensor:
    """The untouched base model's logits on `tiny_batch(family)`."""
    return _base_logits(family).clone()


def make_cfg(**kw) -> moetune.MoEConfig:
    """Small experts, no dropout; the Switch loss is off for `soft` (it would warn: constant there)."""
    kw = {"num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0} | kw
    if kw.get("router") == "soft":
        kw.setdefault("aux_loss_coef", 0.0)
    return moetune.MoEConfig(**kw)


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


TRAINER_MOE = dict(
    num_experts=4,
    bias_update_rate=0.01,
    router_jitter=0.1,
    lora_dropout=0.1,
    attn_r=4,
    importance_loss_coef=0.1,
)


def dataset(n: int = 40, seq: int = 12) -> Dataset:
    ids = torch.randint(3, 127, (n, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::3, -4:] = 0  # some padded rows
    labels = ids.masked_fill(mask == 0, -100)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )


def trainer(out: str, max_steps: int = 8, moe: dict | None = None, **kwargs) -> MoETrainer:
    """A MoETrainer on a tiny llama (config TRAINER_MOE updated by `moe`); kwargs go to TrainingArguments."""
    torch.manual_seed(1)  # adapter initialisation
    model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(**{**TRAINER_MOE, **(moe or {})}))
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=max_steps,
        save_steps=3,
        logging_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **kwargs,
    )
    return MoETrainer(model=model, args=args, train_dataset=dataset(), router_lr_multiplier=3.0)


def snapshot(t: MoETrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state_dict(t.model).items()}
