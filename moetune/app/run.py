"""A fine-tuning run: RunConfig -> model + data -> MoETrainer -> accuracy before/after -> report.

The configuration (`moetune.app.run_config`) is checked first; then the training mixture is built by
the data rules, the model loaded and trained, the held-out tasks scored before and after, and the
outputs (adapter, metrics.json, report.md, plots) written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    TrainerCallback,
    TrainingArguments,
)

from moetune.app.data import (
    DataError,
    Example,
    deduplicate,
    encode,
    mix,
)
from moetune.app.evaluation import EvalItem, evaluate
from moetune.app.run_config import ConfigError, DataConfig, RunConfig
from moetune.config import short_repr
from moetune.core import stats
from moetune.io.atomic import atomic_write_text
from moetune.model import MoEModel, get_moe_model
from moetune.train.callbacks import SaveOnInterrupt, TrainingInterrupted
from moetune.train.checkpoints import last_complete_checkpoint
from moetune.train.trainer import MoETrainer


# ---- the run --------------------------------------------------------------------------------------
@dataclass
class Tasks:
    """Training examples and held-out evaluation items per task."""

    train: dict[str, list[Example]]
    test: dict[str, list[EvalItem]]
    weights: dict[str, float] = field(default_factory=dict)
    validation: dict[str, list[Example]] = field(default_factory=dict)  # the Trainer's eval_dataset


def tasks_from_config(
    data: DataConfig, fallback_options: dict[str, list[str]] | None = None, check_untrained: bool = True
) -> Tasks:
    """Training examples and held-out items of `data`; held-out tasks without `data.options` are scored
    on `fallback_options` (a stage's data inherit the run's). `check_untrained`: a held-out task without
    training records is an error unless `data.allow_untrained_test_tasks` (see `check_held_out`)."""
    if not data.train:
        raise ConfigError("data.train: no training files given")
    train: dict[str, list[Example]] = {}
    weights: dict[str, float] = {}
    for src in data.train:
        for ex in src.examples():
            train.setdefault(ex.task, []).append(ex)
            weights[ex.task] = src.weight
    test = held_out_items(data, fallback_options)
    unknown = sorted(set(data.options) - set(train) - set(test))
    if unknown:
        raise ConfigError(f"data.options names unknown task(s) {unknown}; tasks are {sorted(train)}")
    check_held_out(set(train) if check_untrained else set(test), test, data.allow_untrained_test_tasks)
    validation: dict[str, list[Example]] = {}
    for src in data.validation:
        for ex in src.examples():
            validation.setdefault(ex.task, []).append(ex)
    if data.validation_split:
        rng = random.Random(0)
        for task, exs in train.items():
            order = list(range(len(exs)))
            rng.shuffle(order)
            held = set(order[: max(1, round(len(exs) * data.validation_split))])
            if len(held) == len(exs):
                raise ConfigError(
                    f"data.validation_split={data.validation_split}: task {task!r} has {len(exs)} training "
                    "record(s), too few to hold any out"
                )
            validation[task] = [ex for i, ex in enumerate(exs) if i in held]
            train[task] = [ex for i, ex in enumerate(exs) if i not in held]
    return Tasks(train, test, weights, validation)


def check_held_out(trained: set[str], test: dict[str, list[EvalItem]], allow_untrained: bool) -> None:
    """The mistakes in test data that would otherwise only show as a low score: a task nothing trains
    (unless `allow_untrained`), and an answer that is none of its task's options (never scored right)."""
    untrained = sorted(set(test) - trained)
    if untrained and not allow_untrained:
        raise ConfigError(
            f"data.test: task(s) {untrained} have no training records (training tasks: {sorted(trained)}); "
            "set data.allow_untrained_test_tasks: true to score them anyway"
        )
    for task, items in test.items():
        for item in items:
            if item.options and item.example.response not in item.options:
                raise ConfigError(
                    f"data.options: task {task!r}: the test answer {short_repr(item.example.response)} is "
                    f"none of the options {list(item.options)}, so it could never be scored right"
                )


def held_out_items(
    data: DataConfig, fallback_options: dict[str, list[str]] | None = None
) -> dict[str, list[EvalItem]]:
    """The evaluation items of `data.test`, per task (scored on `data.options`, else `fallback_options`,
    where given)."""
    options = {**(fallback_options or {}), **data.options}
    test: dict[str, list[EvalItem]] = {}
    for src in data.test:
        for ex in src.examples():
            test.setdefault(ex.task, []).append(EvalItem(ex, tuple(options.get(ex.task, ()))))
    return test


def autocast_dtype(training: dict[str, Any]) -> str | None:
    """The mixed precision a run trains in (TrainingArguments' bf16 / fp16), which its evaluation uses
    too, as the Trainer's own evaluation would: "bfloat16", "float16" or None."""
    return "bfloat16" if training.get("bf16") else "float16" if training.get("fp16") else None


def evaluate_tasks(
    model,
    tokenizer,
    test: dict[str, list[EvalItem]],
    log: Callable[[str], None],
    by_task: bool = False,
    autocast: str | None = None,
) -> dict:
    """Per task: accuracy with its 95% interval, and the routing statistics of that task's items.
    `by_task`: each task's items run under `model.use_tasks([task])` (a task the model knows).
    `autocast`: "bfloat16" / "float16" evaluates under torch.autocast (`autocast_dtype`)."""
    results, routing = {}, {}
    device = next(model.parameters()).device.type
    for task, items in test.items():
        start = time.time()
        routed = contextlib.nullcontext()
        if isinstance(model, MoEModel):
            model.reset_routing_stats()
            if by_task:
                routed = model.use_tasks([known_task(model, task)])
        precision = (
            torch.autocast(device, dtype=getattr(torch, autocast)) if autocast else contextlib.nullcontext()
        )
        with routed, precision:
            results[task] = evaluate(model, tokenizer, items)
        if isinstance(model, MoEModel):
            routing[task] = model.routing_stats()
        r = results[task]
        log(
            f"  {task:<12} acc {r['accuracy']:.3f}  [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]  "
            f"n={r['n']}  ({time.time() - start:.0f}s)"
        )
    if len(routing) > 1:
        routing = {"all tasks": stats.merge(list(routing.values())), **routing}
    return {"accuracy": results, "routing": routing}


def known_task(model: MoEModel, task: str) -> str:
    """`task`, checked to be one of the model's tasks (route_by_task)."""
    if task not in model.tasks:
        raise ConfigError(
            f"route_by_task: the data's task {task!r} is not one of the model's tasks {model.tasks} "
            "(moe.task, moe.extra_tasks, or a stage's add_experts.task)"
        )
    return task


# the data rules of the demo and the benchmarks: repeats and test prompts out, tasks in equal shares
CURATED_DATA = {"deduplicate": True, "drop_test_overlap": True, "balance_tasks": True}


def training_mixture(cfg: RunConfig, tasks: Tasks, log: Callable[[str], None] | None = None) -> list[Example]:
    """The run's training examples: every record as given, unless data rules are on (`deduplicate`,
    `drop_test_overlap`, `balance_tasks`); `log` gets one line per rule with what it changed."""
    log = log or (lambda _: None)
    data = cfg.data
    by_task = {t: list(exs) for t, exs in tasks.train.items()}
    log(f"data: {_count(by_task)} training records ({_per_task(by_task)})")
    if tasks.validation:
        log(f"data: {_count(tasks.validation)} validation records ({_per_task(tasks.validation)})")
    if data.drop_test_overlap:
        test_prompts = {item.example.prompt_key for items in tasks.test.values() for item in items}
        kept = {t: [ex for ex in exs if ex.prompt_key not in test_prompts] for t, exs in by_task.items()}
        log(f"data.drop_test_overlap: dropped {_dropped(by_task, kept, 'whose prompt is a test item')}")
        by_task = kept
    if data.deduplicate:
        kept = {t: deduplicate(exs, []) for t, exs in by_task.items()}
        log(f"data.deduplicate: dropped {_dropped(by_task, kept, 'whose prompt repeats an earlier one')}")
        by_task = kept
    by_task = {t: exs for t, exs in by_task.items() if exs}
    if not by_task:
        raise DataError("the training mixture is empty")
    if data.balance_tasks:
        total = data.train_size or _count(by_task)
        weights = {t: w for t, w in tasks.weights.items() if t in by_task} or None
        mixture = mix(by_task, weights, total, seed=cfg.seed)
        shares = Counter(ex.task for ex in mixture)
        log(
            f"data.balance_tasks: {len(mixture)} examples ("
            + ", ".join(f"{t}: {shares[t]} from {len(by_task[t])}" for t in sorted(by_task))
            + ")"
        )
        return mixture
    return [ex for exs in by_task.values() for ex in exs]


def _count(by_task: dict[str, list[Example]]) -> int:
    return sum(map(len, by_task.values()))


def _per_task(by_task: dict[str, list[Example]]) -> str:
    return ", ".join(f"{t}: {len(exs)}" for t, exs in sorted(by_task.items()))


def _dropped(before: dict[str, list[Example]], after: dict[str, list[Example]], why: str) -> str:
    lost = {t: len(exs) - len(after[t]) for t, exs in sorted(before.items()) if len(exs) > len(after[t])}
    per_task = " (" + ", ".join(f"{t}: {n}" for t, n in lost.items()) + ")" if lost else ""
    return f"{sum(lost.values())} records {why}{per_task}"


# what `moetune train` writes in its output directory (stage-<n>/ as well); --overwrite clears these
RUN_OUTPUTS = ("adapter", "checkpoints", "metrics.json", "report.md", "routing.png", "task_expert.png")


def prepare_output_dir(path: str, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse a non-empty output directory unless `resume` (its checkpoints continue) or `overwrite`
    (the previous run's outputs are removed first, so none is left stale). `overwrite` removes only what
    a run writes: a directory holding anything else is refused even then."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--output-dir {path}: exists and is not a directory")
    entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if not entries or resume:
        return
    if not overwrite:
        raise ConfigError(
            f"--output-dir {path}: not empty; pass --overwrite to replace the run there, or --resume to "
            "continue it"
        )
    foreign = [e for e in entries if e not in RUN_OUTPUTS and not re.fullmatch(r"stage-\d+", e)]
    if foreign:
        raise ConfigError(
            f"--output-dir {path}: --overwrite replaces a moetune run's outputs, and this directory also "
            f"holds {foreign[:3]}; choose another directory"
        )
    for entry in entries:
        target = os.path.join(path, entry)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        else:
            os.remove(target)


def launched_rank() -> int:
    """This process's rank under torchrun or accelerate launch (their RANK variable); 0 alone."""
    return int(os.environ.get("RANK", "0"))


def check_run(cfg: RunConfig, output_dir: str, overwrite: bool = False, resume: bool = False) -> None:
    """Everything about a training run that can be checked before a model loads: the output directory,
    the TrainingArguments (strategies, report_to integrations), a checkpoint for `resume`. Under a
    multi-process launch only rank 0 clears an output directory for --overwrite."""
    cfg.model_load.check_installed()
    args = training_arguments(cfg, output_dir)
    has_validation = bool(cfg.data.validation or cfg.data.validation_split)
    if args.eval_strategy != "no" and not has_validation:
        raise ConfigError(
            f"training.eval_strategy={args.eval_strategy.value!r} needs validation data: data.validation "
            "files or data.validation_split"
        )
    if cfg.stages and has_validation:
        raise ConfigError("data.validation: evaluation during training is for runs without stages")
    for stage in cfg.stages:
        training_arguments(dataclasses.replace(cfg, training={**cfg.training, **stage.training}), output_dir)
    if resume and last_complete_checkpoint(os.path.join(output_dir, "checkpoints")) is None:
        raise ConfigError(f"--resume: no complete checkpoint in {os.path.join(output_dir, 'checkpoints')}")
    if launched_rank() == 0:
        prepare_output_dir(output_dir, overwrite, resume)


def training_arguments(cfg: RunConfig, output_dir: str) -> TrainingArguments:
    """The run's TrainingArguments (checkpoints under `output_dir/checkpoints`); a value transformers
    refuses, or a `report_to` integration whose package is missing, is a one-line ConfigError."""
    from transformers.integrations import get_reporting_integration_callbacks

    try:
        args = TrainingArguments(
            **{
                "output_dir": os.path.join(output_dir, "checkpoints"),
                "report_to": [],
                "use_cpu": not torch.cuda.is_available(),
                "seed": cfg.seed,
                "save_strategy": "no",
                "logging_steps": 10,
                "remove_unused_columns": False,
                **cfg.training,
            }
        )
        for callback in get_reporting_integration_callbacks(args.report_to):
            callback()  # raises when the integration's package is not installed
    except (ValueError, TypeError, RuntimeError, ImportError) as err:
        raise ConfigError(f"training: {' '.join(str(err).split())}") from None
    return args


def trainer_inputs(
    tokenizer,
    cfg: RunConfig,
    mixture: list[Example],
    output_dir: str,
    task_names: list[str] | None = None,
    validation: dict[str, list[Example]] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of a transformers Trainer for the run: args, datasets, tokenizer and collator.
    `task_names`: the model's tasks; each example then carries `task_ids`, its task's index there.
    `validation`: per task, the examples of `eval_dataset` (a dict: the Trainer scores each task)."""
    from datasets import Dataset

    def dataset(examples: list[Example]) -> Dataset:
        encoded = [encode(tokenizer, ex, cfg.data.max_length) for ex in examples]
        if task_names is not None:
            for row, ex in zip(encoded, examples, strict=True):
                row["task_ids"] = task_names.index(ex.task)
        if cfg.data.padding_free:
            encoded = [{k: v for k, v in row.items() if k != "attention_mask"} for row in encoded]
        return Dataset.from_list(encoded)

    args = training_arguments(cfg, output_dir)
    if cfg.data.padding_free:  # one row per batch; the first label of each example is already -100
        collator = PaddingFreeCollator(
            return_position_ids=True, separator_id=-100, label_logits_only=cfg.data.label_logits_only
        )
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    inputs = {
        "args": args,
        "train_dataset": dataset(mixture),
        "processing_class": tokenizer,
        "data_collator": collator,
    }
    if validation:
        inputs["eval_dataset"] = {task: dataset(exs) for task, exs in sorted(validation.items())}
    return inputs


class PaddingFreeCollator(DataCollatorWithFlattening):
    """transformers' flattening collator, with `use_cache=False` in every batch: a model builds its
    attention mask from packed position ids only when it has no KV cache, and a causal LM makes one by
    default (its config's use_cache), which would let the examples of a row attend to each other.
    Examples with `task_ids` (task routing) give the batch one task id per packed example.

    `label_logits_only`: the batch also names the positions that predict a label (`logits_to_keep`,
    indices into the one row) and their labels (`shift_labels`, the labels shifted left by one, as the
    causal-LM loss would shift them), so that the model computes the output head only there."""

    def __init__(self, *args, label_logits_only: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.label_logits_only = label_logits_only

    def __call__(self, features, return_tensors=None, separator_id=None):
        batch = {**super().__call__(features, return_tensors, separator_id), "use_cache": False}
        if features and "task_ids" in features[0]:  # the parent drops keys it does not know
            batch["task_ids"] = torch.tensor([f["task_ids"] for f in features if len(f["input_ids"])])
        if self.label_logits_only:
            labels_1L = batch["labels"]
            shifted_1L = torch.nn.functional.pad(labels_1L[:, 1:], (0, 1), value=-100)
            keep_K = (shifted_1L[0] != -100).nonzero().flatten()  # K positions that predict a label
            batch["logits_to_keep"] = keep_K
            batch["shift_labels"] = shifted_1L[:, keep_K]  # (1, K)
        return batch


def fit(
    moe: MoEModel,
    tokenizer,
    cfg: RunConfig,
    mixture: list[Example],
    output_dir: str,
    log: Callable[[str], None] = print,
    resume: bool = False,
    validation: dict[str, list[Example]] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> tuple[MoETrainer, float]:
    """Train `moe` on `mixture` with MoETrainer (checkpoints under `output_dir/checkpoints/`), with
    `callbacks` added to the trainer's; returns the trainer and the training seconds. Ctrl-C saves a
    checkpoint and raises `TrainingInterrupted`."""
    if cfg.routes_by_task:
        for task in {ex.task for ex in mixture}:
            known_task(moe, task)
    task_names = moe.tasks if cfg.routes_by_task else None
    if cfg.data.padding_free and cfg.data.label_logits_only:
        base_class = type(moe.get_base_model())
        if "logits_to_keep" not in inspect.signature(base_class.forward).parameters:
            raise ConfigError(
                f"data.label_logits_only: {base_class.__name__}.forward has no logits_to_keep; "
                "set data.label_logits_only: false"
            )
    trainer = MoETrainer(
        model=moe,
        router_lr_multiplier=cfg.router_lr_multiplier,
        **trainer_inputs(tokenizer, cfg, mixture, output_dir, task_names, validation),
    )
    checkpoint = None
    if resume:
        checkpoint = last_complete_checkpoint(trainer.args.output_dir)
        if checkpoint is None:
            raise ConfigError(f"--resume: no complete checkpoint in {trainer.args.output_dir}")
        log(f"resuming from {checkpoint}")
    start = time.time()
    counts = ", ".join(f"{t}: {n}" for t, n in sorted(Counter(e.task for e in mixture).items()))
    log(f"training on {len(mixture)} examples ({counts})")
    for callback in callbacks:
        trainer.add_callback(callback)
    stopper = SaveOnInterrupt()
    trainer.add_callback(stopper)
    with stopper.installed():
        trainer.train(resume_from_checkpoint=checkpoint)
    if stopper.interrupted:
        saved = last_complete_checkpoint(trainer.args.output_dir)
        raise TrainingInterrupted(trainer.state.global_step, saved)
    return trainer, time.time() - start


def train_and_evaluate(
    model,
    tokenizer,
    cfg: RunConfig,
    tasks: Tasks,
    output_dir: str,
    log: Callable[[str], None] = print,
    resume: bool = False,
) -> dict[str, Any]:
    """Accuracy before, MoE-LoRA training, accuracy after.

    Writes `adapter/`, `metrics.json`, `report.md` and `routing.png` under `output_dir`; checkpoints go
    to `output_dir/checkpoints/`. `resume`: continue from the last complete checkpoint there. Ctrl-C
    during training saves a checkpoint there and raises `TrainingInterrupted` (`SaveOnInterrupt`).
    """
    from moetune.app.plots import plot_routing
    from moetune.app.report import write_report

    os.makedirs(output_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    log("accuracy before fine-tuning:")
    precision = autocast_dtype(cfg.training)
    before = evaluate_tasks(model, tokenizer, tasks.test, log, autocast=precision)
    torch.manual_seed(cfg.seed)
    moe = get_moe_model(model, cfg.moe)
    trainable, total = moe.get_nb_trainable_parameters()
    log(f"moetune: {trainable:,} trainable of {total:,} parameters")

    mixture = training_mixture(cfg, tasks, log)
    trainer, train_seconds = fit(moe, tokenizer, cfg, mixture, output_dir, log, resume, tasks.validation)
    main_process = trainer.is_world_process_zero()  # under torchrun / accelerate: the one that writes
    moe.save_pretrained(os.path.join(output_dir, "adapter"), is_main_process=main_process)
    log("accuracy after fine-tuning:")
    after = evaluate_tasks(moe, tokenizer, tasks.test, log, by_task=cfg.routes_by_task, autocast=precision)
    moe.reset_routing_stats()
    metrics = {
        "before": {t: r["accuracy"] for t, r in before["accuracy"].items()},
        "after": {t: r["accuracy"] for t, r in after["accuracy"].items()},
        "before_detail": before["accuracy"],
        "after_detail": after["accuracy"],
        "routing": after["routing"],
        "train_seconds": round(train_seconds, 1),
        "train_examples": len(mixture),
        "trainable_parameters": trainable,
        "moe_config": cfg.moe.to_dict(),
        "training": {k: v for k, v in cfg.training.items()},
        "log_history": trainer.state.log_history,
    }
    metrics["mean_before"] = _mean(metrics["before"].values())
    metrics["mean_after"] = _mean(metrics["after"].values())
    if not main_process:
        return metrics
    atomic_write_text(os.path.join(output_dir, "metrics.json"), strict_json(metrics))
    if after["routing"]:
        plot_routing(after["routing"], os.path.join(output_dir, "routing.png"))
    write_report(metrics, os.path.join(output_dir, "report.md"))
    return metrics


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def strict_json(value: Any) -> str:
    """JSON that every parser reads: a NaN or infinity (which json.dump writes as bare NaN) is null."""

    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), indent=2, default=str, allow_nan=False)
