"""Quality benchmark: moetune vs peft LoRA on the built-in demo (SmolLM2-135M-Instruct, four tasks).

Every configuration uses the demo's model, train/test split, training hyper-parameters (learning rate,
batch size, epochs, warm-up, seed, max length) and evaluation (option log-likelihood, exact match for
arithmetic, 95% Wilson intervals):
  base               the model without fine-tuning
  peft-lora-r16      peft LoRA r=16, alpha 32: the active rank of moetune's top-2 of r=8 experts
  peft-lora-matched  peft LoRA with the rank whose trainable parameter count is closest to moetune's
                     (alpha = 2 x rank, the same alpha/r scale as the others)
  moetune-e8         the demo's MoE-LoRA: E=8 top-2 r=8 `ffn` experts, its balance losses and bias
Both LoRAs sit on the modules moetune adapts in the demo: the MLP projections (gate, up, down); the
demo puts no LoRA on attention (attn_r=0). LoRA dropout is the demo's. moetune trains through the
demo's path (`moetune.app.run.train_and_evaluate`, MoETrainer); peft through a plain transformers Trainer
built from the same inputs (`moetune.app.run.trainer_inputs`: the same mixture, order, TrainingArguments).
Each configuration runs in its own process, one after the other.

    python benchmarks/quality.py --out quality.json --markdown quality.md        # full: ~1 h on 2 cores
    python benchmarks/quality.py --train-per-task 8 --test-per-task 10 --max-steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from moetune.app import demo
from moetune.app.run import evaluate_tasks, train_and_evaluate, trainer_inputs, training_mixture
from moetune.app.run_config import RunConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from outputs import write_outputs  # noqa: E402

CONFIGS = ("base", "peft-lora-r16", "peft-lora-matched", "moetune-e8")
PEFT_TARGETS = ["gate_proj", "up_proj", "down_proj"]  # the Llama MLP projections moetune's experts adapt
PEFT_R16 = 16
TASK_LABELS = {
    "sentiment": "movie reviews",
    "topic": "BBC topic",
    "tweets": "tweets",
    "arithmetic": "addition (EM)",
}


# ==================================================================================================
# parameter counts (on meta-device copies of the model: no weights, no time)
# ==================================================================================================
def _skeleton(model_config: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def _peft_model(model: torch.nn.Module, rank: int, dropout: float) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=PEFT_TARGETS, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


def parameter_counts(cfg: RunConfig, model_config: Any) -> dict[str, int]:
    """Trainable parameters of moetune and of peft LoRA per rank, and the rank closest to moetune's."""
    from moetune.model import get_moe_model

    moe = get_moe_model(_skeleton(model_config), cfg.moe).get_nb_trainable_parameters()[0]
    per_rank = _peft_model(_skeleton(model_config), 1, cfg.moe.lora_dropout).get_nb_trainable_parameters()[0]
    matched = max(1, round(moe / per_rank))  # a LoRA's parameter count is linear in its rank
    return {
        "moetune-e8": moe,
        "peft_per_rank": per_rank,
        "peft-lora-r16": PEFT_R16 * per_rank,
        "matched_rank": matched,
        "peft-lora-matched": matched * per_rank,
    }


# ==================================================================================================
# one configuration (a worker process)
# ==================================================================================================
def _log(message: str) -> None:
    print(message, flush=True)


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train (unless base) and evaluate one configuration; its accuracies, parameters and train time."""
    cfg, model, tokenizer, tasks = demo.setup(args.train_per_task, args.test_per_task, args.seed)
    if args.max_steps is not None:
        cfg.training["max_steps"] = args.max_steps
    output_dir = os.path.join(args.output_dir, name)
    result: dict[str, Any] = {"trainable_parameters": 0, "train_seconds": 0.0}
    if name == "base":
        accuracy = evaluate_tasks(model, tokenizer, tasks.test, _log)["accuracy"]
    elif name == "moetune-e8":
        metrics = train_and_evaluate(model, tokenizer, cfg, tasks, output_dir, log=_log)
        accuracy = metrics["after_detail"]
        result.update(
            trainable_parameters=metrics["trainable_parameters"],
            train_seconds=metrics["train_seconds"],
            train_examples=metrics["train_examples"],
            accuracy_before=metrics["before_detail"],
            log_history=metrics["log_history"],
        )
    else:
        from transformers import Trainer

        if cfg.moe.attn_r:
            raise ValueError("the demo now puts LoRA on attention: add those modules to PEFT_TARGETS")
        rank = PEFT_R16 if name == "peft-lora-r16" else args.matched_rank
        torch.manual_seed(cfg.seed)  # as train_and_evaluate does before injecting its adapters
        random.seed(cfg.seed)
        peft_model = _peft_model(model, rank, cfg.moe.lora_dropout)
        mixture = training_mixture(cfg, tasks)
        trainer = Trainer(model=peft_model, **trainer_inputs(tokenizer, cfg, mixture, output_dir))
        _log(f"{name}: rank {rank}, {peft_model.get_nb_trainable_parameters()[0]:,} trainable parameters")
        _log(f"training on {len(mixture)} examples")
        start = time.time()
        trainer.train()
        train_seconds = time.time() - start
        _log("accuracy after fine-tuning:")
        accuracy = evaluate_tasks(peft_model, tokenizer, tasks.test, _log)["accuracy"]
        result.update(
            rank=rank,
            trainable_parameters=peft_model.get_nb_trainable_parameters()[0],
            train_seconds=round(train_seconds, 1),
            train_examples=len(mixture),
            log_history=trainer.state.log_history,
        )
    result["accuracy"] = accuracy
    result["mean"] = sum(r["accuracy"] for r in accuracy.values()) / len(accuracy)
    return result


def run_worker(name: str, args: argparse.Namespace, python: str = sys.executable) -> dict[str, Any]:
    """`run_config` in a fresh process (fresh model, fresh RNG state, its own memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        command = [
            python,
            os.path.abspath(__file__),
            "--worker",
            name,
            "--result-file",
            result_file,
            "--seed",
            str(args.seed),
            "--output-dir",
            args.output_dir,
            "--matched-rank",
            str(args.matched_rank),
        ]
        for flag in ("train_per_task", "test_per_task", "max_steps"):
            if getattr(args, flag) is not None:
                command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        subprocess.run(command, check=True)
        with open(result_file, encoding="utf-8") as fh:
            return json.load(fh)


# ==================================================================================================
# report
# ==================================================================================================
def label(name: str, counts: dict[str, int]) -> str:
    rank = counts["matched_rank"]
    return {
        "base": "base (no fine-tuning)",
        "peft-lora-r16": f"peft LoRA r={PEFT_R16}, alpha {2 * PEFT_R16}",
        "peft-lora-matched": f"peft LoRA r={rank}, alpha {2 * rank} (~moetune's parameters)",
        "moetune-e8": "moetune E=8 top-2 r=8",
    }[name]


def markdown_table(results: dict[str, dict[str, Any]], counts: dict[str, int]) -> str:
    tasks = list(next(iter(results.values()))["accuracy"])
    header = [
        "configuration",
        *(f"{TASK_LABELS.get(t, t)} (n={next(iter(results.values()))['accuracy'][t]['n']})" for t in tasks),
        "mean",
        "trainable params",
        "train min",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        cells = [label(name, counts)]
        for t in tasks:
            a = r["accuracy"][t]
            cells.append(f"{100 * a['accuracy']:.1f} [{100 * a['ci95_low']:.1f}, {100 * a['ci95_high']:.1f}]")
        cells.append(f"{100 * r['mean']:.1f}")
        cells.append(f"{r['trainable_parameters']:,}" if r["trainable_parameters"] else "0")
        cells.append(f"{r['train_seconds'] / 60:.1f}" if r["train_seconds"] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def settings(cfg: RunConfig, args: argparse.Namespace, counts: dict[str, int]) -> dict[str, Any]:
    training = dict(cfg.training)
    if args.max_steps is not None:
        training["max_steps"] = args.max_steps
    return {
        "model": cfg.model,
        "seed": args.seed,
        "train_per_task": demo.DEFAULT_TRAIN_PER_TASK if args.train_per_task is None else args.train_per_task,
        "test_per_task": demo.DEFAULT_TEST_PER_TASK if args.test_per_task is None else args.test_per_task,
        "max_length": cfg.data.max_length,
        "training": training,
        "moe": cfg.moe.to_dict(),
        "peft_target_modules": PEFT_TARGETS,
        "lora_dropout": cfg.moe.lora_dropout,
        "parameter_counts": counts,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }


# ==================================================================================================
# main
# ==================================================================================================
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Accuracy of base, peft LoRA and moetune on the built-in demo (same data, steps, seed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--train-per-task", type=int, default=None, help="training examples per task (demo)")
    parser.add_argument("--test-per-task", type=int, default=None, help="held-out items per task (demo)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument("--output-dir", default="runs/quality", help="per-configuration training outputs")
    parser.add_argument("--out", default=None, help="JSON file for all results")
    parser.add_argument("--markdown", default=None, help="Markdown file for the table")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("--matched-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; allowed {list(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_config(args.worker, args)
        with open(args.result_file, "w", encoding="utf-8") as fh:
            json.dump(result, fh, default=str)
        return 0

    cfg, model, _, _ = demo.setup(args.train_per_task, args.test_per_task, args.seed)
    counts = parameter_counts(cfg, model.config)
    del model
    args.matched_rank = counts["matched_rank"]
    print(
        f"trainable parameters: moetune E=8 top-2 r=8 {counts['moetune-e8']:,}; "
        f"peft LoRA {counts['peft_per_rank']:,} per rank: r={PEFT_R16} {counts['peft-lora-r16']:,}, "
        f"r={args.matched_rank} {counts['peft-lora-matched']:,} (closest to moetune)",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    for name in args.configs:
        print(f"\n=== {name} ===", flush=True)
        start = time.time()
        results[name] = run_worker(name, args)
        results[name]["wall_seconds"] = round(time.time() - start, 1)
    table = markdown_table(results, counts)
    before = results.get("moetune-e8", {}).get("accuracy_before")
    if "base" in results and before and before != results["base"]["accuracy"]:
        print("warning: the base row differs from moetune's accuracy before fine-tuning", flush=True)
    report = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "settings": settings(cfg, args, counts),
        "labels": {name: label(name, counts) for name in results},
        "results": results,
    }
    write_outputs(args.out, report, args.markdown, table)
    print("\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
