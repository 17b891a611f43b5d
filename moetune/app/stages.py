"""Continual-learning runs: stages trained one after the other, each may add experts for a new task.

A YAML with `stages:` (see `moetune.app.run_config.StageConfig`) trains, per stage: `add_experts` (new experts
for a new task, everything before frozen by default), then MoETrainer on the stage's own
data. After every stage all held-out tasks (top-level `data.test` and each stage's) are evaluated
with task routing (each task's items under `use_tasks([task])`, when `route_by_task`) and, for a
model with several tasks and no `task_routing`, also with every expert open to every token. So a run
shows what each stage did to the tasks before it (forgetting) and what the new experts learnt.

Writes `adapter/` (the final model), `stage-<n>/adapter/` after each stage, `metrics.json` and
`report.md` under the output directory.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable
from typing import Any

import torch

from moetune.app.evaluation import EvalItem
from moetune.app.run import (
    Tasks,
    autocast_dtype,
    check_held_out,
    evaluate_tasks,
    fit,
    held_out_items,
    strict_json,
    tasks_from_config,
    training_mixture,
)
from moetune.app.run_config import ConfigError, RunConfig
from moetune.io.atomic import atomic_write_text
from moetune.model import MoEModel, get_moe_model


def stage_name(cfg: RunConfig, i: int) -> str:
    return cfg.stages[i].name or f"stage-{i + 1}"


def stage_tasks(cfg: RunConfig) -> tuple[list[Tasks], dict[str, list[EvalItem]]]:
    """Each stage's training data, and the held-out items of every task (top level and stages).
    Read before any model loads, so bad data fail first."""
    # a stage's held-out tasks are scored on its options, else the top level's
    per_stage = [
        tasks_from_config(stage.data, cfg.data.options, check_untrained=False) for stage in cfg.stages
    ]
    test = held_out_items(cfg.data)
    for tasks in per_stage:
        for task, items in tasks.test.items():
            test.setdefault(task, []).extend(items)
    trained = set().union(*(tasks.train for tasks in per_stage))
    check_held_out(trained, test, cfg.data.allow_untrained_test_tasks)
    named = set(test) | trained
    unknown = sorted(set(cfg.data.options) - named)
    if unknown:
        raise ConfigError(f"data.options names unknown task(s) {unknown}; tasks are {sorted(named)}")
    if cfg.routes_by_task:
        _check_tasks_known(cfg, per_stage, test)
    return per_stage, test


def _check_tasks_known(cfg: RunConfig, per_stage: list[Tasks], test: dict[str, list[EvalItem]]) -> None:
    """With route_by_task, each stage trains only tasks the model has by then, and every held-out task
    is one of the model's by the end."""
    known = cfg.moe.task_names()
    for i, (stage, tasks) in enumerate(zip(cfg.stages, per_stage, strict=True)):
        if stage.add_experts is not None:
            known.append(stage.add_experts.task)
        for task in tasks.train:
            if task not in known:
                raise ConfigError(
                    f"stages[{i}]: route_by_task: the data's task {task!r} is not one of the model's tasks "
                    f"{known} at that stage (moe.task, moe.extra_tasks, or an add_experts.task)"
                )
    unknown = sorted(set(test) - set(known))
    if unknown:
        raise ConfigError(
            f"route_by_task: held-out task(s) {unknown} are not among the model's tasks {known}"
        )


def evaluate_stage(moe: MoEModel, tokenizer, cfg: RunConfig, test, log: Callable[[str], None]) -> dict:
    """Accuracy per task: task-routed (if the run routes by task) and with every expert open."""
    result = {}
    if cfg.routes_by_task:  # tasks whose experts come in a later stage are not evaluated this way yet
        log("  with task routing:")
        known = {task: items for task, items in test.items() if task in moe.tasks}
        result["task_routed"] = evaluate_tasks(
            moe, tokenizer, known, log, by_task=True, autocast=autocast_dtype(cfg.training)
        )["accuracy"]
    if not cfg.routes_by_task or (len(moe.tasks) > 1 and moe.moe_config.task_routing == "none"):
        log("  every expert open to every token:")
        result["all_experts"] = evaluate_tasks(
            moe, tokenizer, test, log, autocast=autocast_dtype(cfg.training)
        )["accuracy"]
    return result


def run_stages(
    model, tokenizer, cfg: RunConfig, output_dir: str, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train the stages of `cfg` in order on `model` (a transformers model); metrics per stage."""
    per_stage, test = stage_tasks(cfg)
    os.makedirs(output_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    log("accuracy before fine-tuning:")
    before = evaluate_tasks(model, tokenizer, test, log, autocast=autocast_dtype(cfg.training))["accuracy"]
    torch.manual_seed(cfg.seed)
    moe = get_moe_model(model, cfg.moe)
    stages = []
    for i, (stage, tasks) in enumerate(zip(cfg.stages, per_stage, strict=True)):
        name = stage_name(cfg, i)
        log(f"{name}:")
        if stage.add_experts is not None:
            add = stage.add_experts
            moe.add_experts(add.num_experts, task=add.task, freeze_existing=add.freeze_existing)
            log(
                f"  added {add.num_experts} experts for task {add.task!r} "
                f"(freeze_existing={add.freeze_existing})"
            )
        stage_cfg = dataclasses.replace(cfg, data=stage.data, training={**cfg.training, **stage.training})
        mixture = training_mixture(stage_cfg, Tasks(tasks.train, test, tasks.weights), log)
        stage_dir = os.path.join(output_dir, f"stage-{i + 1}")
        trainer, seconds = fit(moe, tokenizer, stage_cfg, mixture, stage_dir, log)
        moe.save_pretrained(os.path.join(stage_dir, "adapter"))
        log(f"accuracy after {name}:")
        stages.append(
            {
                "name": name,
                "add_experts": dataclasses.asdict(stage.add_experts) if stage.add_experts else None,
                "train_examples": len(mixture),
                "train_seconds": round(seconds, 1),
                "trainable_parameters": moe.get_nb_trainable_parameters()[0],
                "accuracy": evaluate_stage(moe, tokenizer, cfg, test, log),
                "log_history": trainer.state.log_history,
            }
        )
    moe.save_pretrained(os.path.join(output_dir, "adapter"))
    metrics = {
        "before": before,
        "stages": stages,
        "tasks": moe.tasks,
        "moe_config": moe.moe_config.to_dict(),
        "route_by_task": cfg.routes_by_task,
    }
    atomic_write_text(os.path.join(output_dir, "metrics.json"), strict_json(metrics))
    atomic_write_text(os.path.join(output_dir, "report.md"), stages_report(metrics))
    return metrics


def stages_report(metrics: dict[str, Any]) -> str:
    """Markdown: accuracy of every task before training and after each stage (each routing mode)."""
    columns = [("before", metrics["before"])]
    for stage in metrics["stages"]:
        for mode, label in (("task_routed", "task-routed"), ("all_experts", "all experts")):
            if mode in stage["accuracy"]:
                columns.append((f"after {stage['name']} ({label})", stage["accuracy"][mode]))
    lines = [
        "# moetune continual-learning report",
        "",
        "Accuracy (%) per held-out task, with 95% Wilson intervals, before training and after each stage.",
        "",
        "| task | " + " | ".join(label for label, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for task in metrics["before"]:
        cells = [
            f"{100 * acc[task]['accuracy']:.1f} [{100 * acc[task]['ci95_low']:.1f}, "
            f"{100 * acc[task]['ci95_high']:.1f}]"
            if task in acc
            else "–"  # the task has no experts yet
            for _, acc in columns
        ]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "## Stages", ""]
    for stage in metrics["stages"]:
        added = stage["add_experts"]
        what = f"added {added['num_experts']} experts for {added['task']!r}; " if added else ""
        lines.append(
            f"- {stage['name']}: {what}{stage['train_examples']} examples, {stage['train_seconds']} s, "
            f"{stage['trainable_parameters']:,} trainable parameters"
        )
    lines += [
        "",
        f"Tasks of the final model: {metrics['tasks']}; route_by_task: {metrics['route_by_task']}",
        "",
    ]
    return "\n".join(lines)
