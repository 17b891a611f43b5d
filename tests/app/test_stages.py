"""Continual-learning runs from YAML (`stages:`): train task A, add experts for task B, train B, evaluate
both with and without task routing; task A's task-routed results survive stage B exactly."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
import yaml

from moetune.app import cli
from moetune.app.data import DataError
from moetune.app.run import trainer_inputs
from moetune.app.run_config import ConfigError, load_run_config
from moetune.app.stages import run_stages, stage_tasks
from moetune.io.adapter import read_weights
from tests.helpers.tiny_models import tiny_chat_tokenizer, tiny_model


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def toy_files(tmp_path) -> dict[str, str]:
    rng = random.Random(0)

    def review() -> dict:
        word = rng.choice(["good", "bad"])
        label = "positive" if word == "good" else "negative"
        return {"prompt": f"Review: {word} film {rng.randint(0, 99)}", "response": label, "task": "sentiment"}

    def addition() -> dict:
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return {"prompt": f"what is {a} + {b} ?", "response": str(a + b), "task": "arithmetic"}

    return {
        "a_train": write_jsonl(tmp_path / "a_train.jsonl", [review() for _ in range(32)]),
        "a_test": write_jsonl(tmp_path / "a_test.jsonl", [review() for _ in range(10)]),
        "b_train": write_jsonl(tmp_path / "b_train.jsonl", [addition() for _ in range(32)]),
        "b_test": write_jsonl(tmp_path / "b_test.jsonl", [addition() for _ in range(8)]),
    }


def stages_yaml(tmp_path, files: dict[str, str], **extra) -> str:
    training = dict(per_device_train_batch_size=8, learning_rate=5e-3, max_steps=6, disable_tqdm=True)
    raw = {
        "model": "tiny",
        "route_by_task": True,
        "moe": {"task": "sentiment", "num_experts": 4, "top_k": 2, "r": 4, "lora_dropout": 0.0},
        "data": {
            "test": [files["a_test"]],
            "max_length": 32,
            "options": {"sentiment": ["positive", "negative"]},
        },
        "training": training,
        "stages": [
            {"name": "A", "data": {"train": [files["a_train"]], "max_length": 32}},
            {
                "name": "B",
                "add_experts": {"num_experts": 2, "task": "arithmetic"},
                "data": {"train": [files["b_train"]], "test": [files["b_test"]], "max_length": 32},
                "training": {"max_steps": 4},
            },
        ],
    } | extra
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    cfg = load_run_config(stages_yaml(tmp, toy_files(tmp)))
    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(0)
    model = tiny_model("llama")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = str(tmp / "run")
    metrics = run_stages(model, tokenizer, cfg, out, log=lambda _m: None)
    return out, metrics


def test_stages_write_their_files_and_metrics(finished) -> None:
    out, metrics = finished
    for name in ("adapter", "stage-1/adapter", "stage-2/adapter"):
        assert os.path.isfile(os.path.join(out, name, "moetune_model.safetensors")), name
    saved = json.loads(Path(out, "metrics.json").read_text())
    assert [s["name"] for s in saved["stages"]] == ["A", "B"]
    assert saved["tasks"] == ["sentiment", "arithmetic"]
    first, second = saved["stages"]
    assert set(first["accuracy"]) == {"task_routed"}  # one task: nothing else to compare with
    assert set(second["accuracy"]) == {"task_routed", "all_experts"}
    assert set(second["accuracy"]["task_routed"]) == {"sentiment", "arithmetic"}
    assert second["add_experts"] == {"num_experts": 2, "task": "arithmetic", "freeze_existing": True}
    assert second["trainable_parameters"] < first["trainable_parameters"]  # only B's 2 experts train
    assert any("train_loss" in h for h in second["log_history"])
    report = Path(out, "report.md").read_text()
    assert (
        "after B (task-routed)" in report and "after B (all experts)" in report and "| sentiment |" in report
    )


def test_task_a_survives_stage_b_exactly(finished) -> None:
    out, metrics = finished
    a, b = metrics["stages"]
    assert b["accuracy"]["task_routed"]["sentiment"] == a["accuracy"]["task_routed"]["sentiment"]
    _, after_a = read_weights(os.path.join(out, "stage-1/adapter/moetune_model.safetensors"))
    _, after_b = read_weights(os.path.join(out, "stage-2/adapter/moetune_model.safetensors"))
    checked = 0
    for key, old in after_a.items():  # A's experts, router rows and bias entries, unchanged
        if key.endswith(("lora_A.0", "lora_B.0", "weight_blocks.0", "expert_bias")):
            assert torch.equal(old, after_b[key][: old.shape[0]]), key
            checked += 1
    assert checked == 2 * (3 * 2 + 2)  # 2 layers x (gate/up/down A and B + router rows + bias)
    assert any(k.endswith("lora_B.1") for k in after_b)  # B's block exists
    assert any(after_b[k].abs().sum() > 0 for k in after_b if k.endswith("lora_B.1"))  # and trained


def test_training_batches_carry_the_task_index(tmp_path) -> None:
    from moetune.app.data import Example
    from moetune.app.run_config import RunConfig

    mixture = [Example((("user", "q"), ("assistant", "a")), t) for t in ("B", "A", "B")]
    inputs = trainer_inputs(tiny_chat_tokenizer(), RunConfig(), mixture, str(tmp_path), ["A", "B"])
    assert inputs["train_dataset"]["task_ids"] == [1, 0, 1]
    batch = inputs["data_collator"]([inputs["train_dataset"][i] for i in range(3)])
    assert batch["task_ids"].tolist() == [1, 0, 1]
    assert (
        "task_ids"
        not in trainer_inputs(tiny_chat_tokenizer(), RunConfig(), mixture, str(tmp_path))[
            "train_dataset"
        ].column_names
    )


def test_bad_stage_configs_are_clear_errors(tmp_path) -> None:
    files = toy_files(tmp_path)
    with pytest.raises(ConfigError, match=r"data.train: with stages, each stage names its training files"):
        load_run_config(stages_yaml(tmp_path, files, data={"train": [files["a_train"]]}))
    bad = yaml.safe_load(Path(stages_yaml(tmp_path, files)).read_text())
    bad["stages"][1]["add_experts"] = {"num_experts": 0, "task": "arithmetic"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"stages\[1\]: add_experts: num_experts=0: must be an int >= 1"):
        load_run_config(tmp_path / "bad.yaml")
    bad["stages"][1] = {"data": {"train": [files["b_train"]]}, "epochs": 3}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"stages\[1\]: unknown key\(s\) \['epochs'\]"):
        load_run_config(tmp_path / "bad.yaml")


def test_a_data_task_the_model_does_not_know_is_refused(tmp_path) -> None:
    files = toy_files(tmp_path)
    raw = yaml.safe_load(Path(stages_yaml(tmp_path, files)).read_text())
    del raw["stages"][1]["add_experts"]  # arithmetic data, but no task of that name in the model
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_run_config(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match=r"stages\[1\]: route_by_task: the data's task 'arithmetic' is not"):
        stage_tasks(cfg)  # before any model loads
    assert cli.main(["train", str(tmp_path / "s.yaml"), "--output-dir", str(tmp_path / "out")]) == 2


def test_resume_with_stages_is_refused(tmp_path, capsys) -> None:
    path = stages_yaml(tmp_path, toy_files(tmp_path))
    assert cli.main(["train", path, "--output-dir", str(tmp_path / "out"), "--resume"]) == 2
    assert "this config has stages" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_cli_stages_then_eval_and_stats_route_by_task(tmp_path, monkeypatch, capsys) -> None:
    """`moetune train` with stages on a local tiny model; `moetune eval` reproduces the final stage's
    task-routed accuracies (and its all-experts ones with --all-experts); `moetune stats` plots tasks."""
    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(0)
    base = tiny_model("llama")
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    base.save_pretrained(tmp_path / "tiny-llama")
    tokenizer.save_pretrained(tmp_path / "tiny-llama")
    raw = yaml.safe_load(Path(stages_yaml(tmp_path, toy_files(tmp_path))).read_text())
    raw["model"] = "tiny-llama"
    (tmp_path / "stages.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "stages.yaml", "--output-dir", "out"]) == 0
    final = json.loads(Path("out/metrics.json").read_text())["stages"][-1]["accuracy"]
    capsys.readouterr()
    for flags, mode in (([], "task_routed"), (["--all-experts"], "all_experts")):
        assert cli.main(["eval", "--adapter", "out/adapter", *flags]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed == {task: r["accuracy"] for task, r in final[mode].items()}
    assert cli.main(["stats", "--adapter", "out/adapter", "--output-dir", "plots"]) == 0
    assert (tmp_path / "plots" / "task_expert.png").stat().st_size > 0
    tables = capsys.readouterr().out
    assert "sentiment" in tables and "arithmetic" in tables


def test_the_example_config_parses_and_splits_tasks_by_stage() -> None:
    root = Path(__file__).resolve().parents[2]
    cwd = os.getcwd()
    os.chdir(root)  # its data paths are relative to the repository
    try:
        cfg = load_run_config("examples/continual.yaml")
        per_stage, test = stage_tasks(cfg)
    finally:
        os.chdir(cwd)
    assert [list(t.train) for t in per_stage] == [["sentiment"], ["arithmetic"]]
    assert set(test) == {"sentiment", "arithmetic"} and cfg.routes_by_task
    assert cfg.stages[1].add_experts.task == "arithmetic"


def test_only_tasks_errors(tmp_path) -> None:
    files = toy_files(tmp_path)
    raw = yaml.safe_load(Path(stages_yaml(tmp_path, files)).read_text())
    raw["stages"][0]["data"]["train"] = [{"path": files["a_train"], "only_tasks": "sentiment"}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"only_tasks='sentiment': must be a non-empty list of task names"):
        load_run_config(tmp_path / "c.yaml")
    raw["stages"][0]["data"]["train"] = [{"path": files["a_train"], "only_tasks": ["topic"]}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError, match=r"a_train.jsonl: no record of the tasks \['topic'\]"):
        stage_tasks(load_run_config(tmp_path / "c.yaml"))
