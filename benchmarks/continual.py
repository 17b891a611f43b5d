"""Continual-learning benchmark: train task A, then task B, and measure what B does to A.

On the built-in demo's model (SmolLM2-135M-Instruct) and data: task A = BBC news topic (5 classes),
task B = movie-review sentiment (2 classes), both scored by option log-likelihood with 95% Wilson
intervals, the demo's training hyper-parameters, `--epochs` passes over each task's examples per stage.
  peft-lora-seq         peft LoRA r=16 on the MLP projections, trained on A, then on B (the same adapter)
  moetune-shared        moetune E=8 top-2 r=8 trained on A, then on B (the same experts, no task ids)
  moetune-expand        moetune E=4 for A; then `add_experts(4, task="sentiment", freeze_existing=True)`
                        and B trained with task ids (B's tokens route among B's experts); evaluated
                        task-routed (each task's items under use_tasks([task])) and with all experts open
moetune runs through `moetune.app.stages.run_stages` (the code behind `moetune train` with `stages:`), from
JSONL files of the demo's examples; peft through a plain transformers Trainer on the same examples, order
and TrainingArguments (`moetune.app.run.trainer_inputs`).

    python benchmarks/continual.py --out continual.json --markdown continual.md      # ~45 min on 2 cores
    python benchmarks/continual.py --train-per-task 16 --test-per-task 8 --epochs 1   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import time
from typing import Any

import torch

from moetune.app import demo
from moetune.app.run import CURATED_DATA, Tasks, evaluate_tasks, trainer_inputs, training_mixture
from moetune.app.run_config import AddExperts, DataConfig, DataSource, RunConfig, StageConfig
from moetune.app.stages import run_stages

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from outputs import write_outputs  # noqa: E402

TASK_A, TASK_B = "topic", "sentiment"
CONFIGS = ("peft-lora-seq", "moetune-shared", "moetune-expand")
PEFT_TARGETS = ["gate_proj", "up_proj", "down_proj"]


def _log(message: str) -> None:
    print(message, flush=True)


def write_task_files(tasks: Tasks, directory: str) -> dict[str, str]:
    """The demo's examples as JSONL files (messages + task), one train and one test file per task."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for split, by_task in (("train", tasks.train), ("test", tasks.test)):
        for task, items in by_task.items():
            path = os.path.join(directory, f"{task}.{split}.jsonl")
            with open(path, "w", encoding="utf-8") as fh:
                for item in items:
                    ex = item if split == "train" else item.example
                    messages = [{"role": role, "content": text} for role, text in ex.messages]
                    fh.write(json.dumps({"messages": messages, "task": task}) + "\n")
            paths[f"{task}.{split}"] = path
    return paths


def demo_data(args: argparse.Namespace):
    """(RunConfig, model, tokenizer, Tasks of A and B, answer options per task) of the demo."""
    cfg, model, tokenizer, tasks = demo.setup(args.train_per_task, args.test_per_task, args.seed)
    keep = (TASK_A, TASK_B)
    tasks = Tasks({t: tasks.train[t] for t in keep}, {t: tasks.test[t] for t in keep})
    options = {t: list(tasks.test[t][0].options) for t in keep}
    cfg.training["num_train_epochs"] = args.epochs
    if args.max_steps is not None:
        cfg.training["max_steps"] = args.max_steps
    return cfg, model, tokenizer, tasks, options


def stage_config(cfg: RunConfig, paths: dict[str, str], options, expand: bool) -> RunConfig:
    def data(task: str) -> DataConfig:
        return DataConfig(
            train=[DataSource(paths[f"{task}.train"])],
            test=[DataSource(paths[f"{task}.test"])],
            max_length=cfg.data.max_length,
            **CURATED_DATA,
        )

    moe = dataclasses.replace(cfg.moe, task=TASK_A, num_experts=4 if expand else 8)
    add = AddExperts(num_experts=4, task=TASK_B) if expand else None
    stages = [
        StageConfig(data=data(TASK_A), name="A"),
        StageConfig(data=data(TASK_B), name="B", add_experts=add),
    ]
    return dataclasses.replace(
        cfg,
        moe=moe,
        data=DataConfig(max_length=cfg.data.max_length, options=options, **CURATED_DATA),
        stages=stages,
        route_by_task=expand,
    )


def run_moetune(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg, model, tokenizer, tasks, options = demo_data(args)
    paths = write_task_files(tasks, os.path.join(args.output_dir, "data"))
    run_cfg = stage_config(cfg, paths, options, expand=name == "moetune-expand")
    metrics = run_stages(model, tokenizer, run_cfg, os.path.join(args.output_dir, name), log=_log)
    return {
        "before": metrics["before"],
        "stages": [
            {k: s[k] for k in ("name", "accuracy", "train_examples", "train_seconds", "trainable_parameters")}
            for s in metrics["stages"]
        ],
    }


def run_peft(args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    cfg, model, tokenizer, tasks, _ = demo_data(args)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=cfg.moe.lora_dropout,
        target_modules=PEFT_TARGETS,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    stages = []
    for name, task in (("A", TASK_A), ("B", TASK_B)):
        stage_tasks = Tasks({task: tasks.train[task]}, tasks.test)
        mixture = training_mixture(cfg, stage_tasks)
        out = os.path.join(args.output_dir, "peft-lora-seq", f"stage-{name}")
        trainer = Trainer(model=peft_model, **trainer_inputs(tokenizer, cfg, mixture, out))
        start = time.time()
        trainer.train()
        seconds = time.time() - start
        _log(f"accuracy after {name}:")
        accuracy = evaluate_tasks(peft_model, tokenizer, tasks.test, _log)["accuracy"]
        stages.append(
            {
                "name": name,
                "accuracy": {"all_experts": accuracy},
                "train_examples": len(mixture),
                "train_seconds": round(seconds, 1),
                "trainable_parameters": peft_model.get_nb_trainable_parameters()[0],
            }
        )
    return {"stages": stages}


def _pct(r: dict[str, Any]) -> str:
    return f"{100 * r['accuracy']:.1f} [{100 * r['ci95_low']:.1f}, {100 * r['ci95_high']:.1f}]"


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        f"| configuration | {TASK_A} (A) after A | {TASK_A} (A) after B | {TASK_B} (B) after B | "
        "trainable params (stage B) |",
        "|---|---|---|---|---|",
    ]
    base = results.get("base")
    if base:
        lines.append(
            f"| base model | {_pct(base[TASK_A])} | {_pct(base[TASK_A])} | {_pct(base[TASK_B])} | 0 |"
        )
    for name in CONFIGS:
        if name not in results:
            continue
        a, b = results[name]["stages"]
        for mode, label in (("all_experts", ""), ("task_routed", " (task-routed)")):
            if mode not in b["accuracy"]:
                continue
            if name == "moetune-expand" and mode == "all_experts":
                label = " (all experts open)"
            after_a = a["accuracy"].get(mode, a["accuracy"].get("task_routed"))
            lines.append(
                f"| {name}{label} | {_pct(after_a[TASK_A])} | {_pct(b['accuracy'][mode][TASK_A])} | "
                f"{_pct(b['accuracy'][mode][TASK_B])} | {b['trainable_parameters']:,} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS)
    )
    p.add_argument("--train-per-task", type=int, default=200)
    p.add_argument("--test-per-task", type=int, default=200)
    p.add_argument("--epochs", type=float, default=2.0, help="passes over a task's examples per stage")
    p.add_argument("--max-steps", type=int, default=None, help="cap per stage (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/continual")
    p.add_argument("--out", default=None, help="results JSON")
    p.add_argument("--markdown", default=None, help="results table (Markdown)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    results: dict[str, Any] = {}
    for name in names:
        _log(f"=== {name}")
        start = time.time()
        results[name] = run_peft(args) if name == "peft-lora-seq" else run_moetune(name, args)
        results[name]["seconds"] = round(time.time() - start, 1)
        if "before" in results[name]:
            results.setdefault("base", results[name]["before"])
    results["settings"] = {
        "train_per_task": args.train_per_task,
        "test_per_task": args.test_per_task,
        "epochs_per_stage": args.epochs,
        "max_steps": args.max_steps,
        "seed": args.seed,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    table = markdown_table(results)
    print(table)
    write_outputs(args.out, results, args.markdown, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
