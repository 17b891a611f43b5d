"""The run pipeline end to end on a tiny model: files written, accuracy reproducible from the adapter."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from moetune.config import MoEConfig
from moetune.data import Example
from moetune.evaluation import EvalItem, evaluate
from moetune.model import MoEModel
from moetune.run import DataConfig, RunConfig, Tasks, train_and_evaluate
from tests.tiny_models import tiny_chat_tokenizer, tiny_model


def toy_tasks(n_train: int = 48, n_test: int = 12) -> Tasks:
    rng = random.Random(0)

    def sentiment() -> Example:
        word = rng.choice(["good", "bad"])
        label = "positive" if word == "good" else "negative"
        return Example(
            (("user", f"Review: {word} film {rng.randint(0, 99)}"), ("assistant", label)), "sentiment"
        )

    def addition() -> Example:
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return Example((("user", f"what is {a} + {b} ?"), ("assistant", str(a + b))), "arithmetic")

    train = {
        "sentiment": [sentiment() for _ in range(n_train)],
        "arithmetic": [addition() for _ in range(n_train)],
    }
    test = {
        "sentiment": [EvalItem(sentiment(), ("positive", "negative")) for _ in range(n_test)],
        "arithmetic": [EvalItem(addition()) for _ in range(n_test)],
    }
    return Tasks(train, test)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(0)
    model = tiny_model("llama")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    cfg = RunConfig(
        model="tiny",
        moe=MoEConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0),
        data=DataConfig(max_length=32),
        training=dict(
            per_device_train_batch_size=8,
            learning_rate=5e-3,
            max_steps=12,
            logging_steps=4,
            disable_tqdm=True,
        ),
    )
    metrics = train_and_evaluate(model, tokenizer, cfg, toy_tasks(), out, log=lambda _m: None)
    return out, metrics, tokenizer


def test_run_writes_its_files(finished_run) -> None:
    out, metrics, _ = finished_run
    for name in (
        "adapter/moetune_config.json",
        "adapter/moetune_model.safetensors",
        "metrics.json",
        "report.md",
        "routing.png",
    ):
        assert os.path.isfile(os.path.join(out, name)), name
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert set(saved["before"]) == set(saved["after"]) == {"sentiment", "arithmetic"}
    assert set(saved["routing"]) == {"sentiment", "arithmetic"}
    layer_stats = next(iter(saved["routing"]["sentiment"].values()))
    assert sum(layer_stats["tokens_per_expert"]) > 0
    assert any("moe/aux_loss" in h for h in saved["log_history"])  # router metrics reached the logs
    report = open(os.path.join(out, "report.md")).read()
    assert "| sentiment | 12 |" in report and "**mean**" in report


def test_adapter_reproduces_after_accuracy(finished_run) -> None:
    out, metrics, tokenizer = finished_run
    base = tiny_model("llama")
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    model = MoEModel.from_pretrained(base, os.path.join(out, "adapter"))
    tasks = toy_tasks()
    for task, items in tasks.test.items():
        assert evaluate(model, tokenizer, items)["accuracy"] == metrics["after"][task], task
