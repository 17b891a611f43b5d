"""Multi-task benchmark: moetune's MoE-LoRA configurations against tuned peft LoRA, rsLoRA and DoRA.

Eleven tasks (benchmarks/multitask_data.py) on SmolLM2-135M-Instruct, the same data order, steps,
batch size and max length for every method, trained and scored under bf16 autocast. The protocol:
  grid     every method trains at each learning rate of the grid (seed 0) and is scored on the
           validation split; a best rate at the grid's edge extends the grid by one more factor of 2
           that way (twice at most). The chosen rate is the best mean validation accuracy over tasks.
  seeds    every method's test split at its chosen rate; the baselines and the three best moetune
           candidates (by validation) train again at their chosen rate with seeds 1 and 2 (a seed sets
           the adapter's initialisation and the data order).
  scaling  accuracy against trainable parameters: LoRA over ranks 8-256 at the rate chosen for LoRA
           r=16, moetune over E = 4-64 experts (top-2, r=8) at the rate chosen for its default.
  timing   the training step time of the baselines and the three best candidates, apart from the
           runs: rounds that run every method in turn for a few steps, on an otherwise idle machine.
  report   per method: chosen rate, mean validation and test accuracy (per seed and over seeds),
           per-task test accuracy, trainable parameters, seconds per training step, effective experts;
           for every moetune configuration a paired bootstrap 95% interval of its test-accuracy
           difference to the best baseline (the baseline with the best validation mean), resampling
           test items within each task and seeds, paired.
Every run writes its own JSON (per-item correctness) under --runs-dir, so the sweep resumes where it
stopped and can grow over several sittings. A run trains, saves its adapter under --adapters-dir and
scores the validation split; the test split is scored from that adapter only for the runs the report
reads. Runs of another protocol (other data sizes, steps, grid...) are ignored.

    python benchmarks/multitask.py                       # grid, seeds, scaling, timing, then the report
    python benchmarks/multitask.py --phase timing        # the step times again (sweep stopped)
    python benchmarks/multitask.py --phase grid --methods lora-r16,moe-default --max-runs 4
    python benchmarks/multitask.py --phase report        # tables, JSON and scaling.png from the runs
    python benchmarks/multitask.py --quick --results-dir /tmp/mt   # tiny model, 2 tasks, 2 steps
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multitask_data  # noqa: E402
from outputs import write_outputs, write_text  # noqa: E402

PEFT_TARGETS = ["gate_proj", "up_proj", "down_proj"]  # the Llama MLP projections moetune's experts adapt
MOE_BASE = dict(num_experts=8, top_k=2, r=8, lora_alpha=16, lora_dropout=0.05)  # + MoEConfig defaults


@dataclass(frozen=True)
class Method:
    """One configuration under test. `lora`: peft LoraConfig fields (r may be "matched": the rank
    whose parameter count is closest to moetune's default); `moe`: MoEConfig fields over MOE_BASE."""

    label: str
    lora: dict[str, Any] = field(default_factory=dict)
    moe: dict[str, Any] = field(default_factory=dict)
    router_lr_multiplier: float = 1.0
    route_by_task: bool = False

    @property
    def baseline(self) -> bool:
        return bool(self.lora)


def _mola(num_layers: int) -> list[int]:
    """MoLA's expert counts growing with depth: 2 / 4 / 6 / 8 by quarter of the layers."""
    return [2 * (1 + 4 * i // num_layers) for i in range(num_layers)]


METHODS: dict[str, Method] = {
    # baselines (peft), on the same MLP projections
    "lora-r16": Method("LoRA r=16 (moetune's active rank)", lora=dict(r=16, lora_alpha=32)),
    "lora-matched": Method("LoRA at moetune's parameter count", lora=dict(r="matched", lora_alpha="2r")),
    "rslora-matched": Method(
        "rsLoRA at moetune's parameter count, alpha 32",
        lora=dict(r="matched", lora_alpha=32, use_rslora=True),
    ),
    "dora-r16": Method("DoRA r=16", lora=dict(r=16, lora_alpha=32, use_dora=True)),
    # moetune candidates
    "moe-default": Method("MixLoRA ffn E=8 top-2 r=8, aux + z loss (today's defaults)"),
    "moe-shared": Method("+ one shared expert", moe=dict(num_shared_experts=1)),
    # top-2 weights sum to 1, so each routed expert acts at half its alpha / r: alpha 32 gives the pair
    # the update scale of LoRA r=16 alpha 32, with A and the routers at the same learning rate
    "moe-alpha32": Method("E=8 top-2 r=8, alpha 32 (LoRA r=16's scale per token)", moe=dict(lora_alpha=32)),
    "moe-hydra": Method("HydraLoRA: asymmetric experts (one shared A)", moe=dict(asymmetric_experts=True)),
    "moe-loramoe": Method(
        "LoRAMoE: linear experts, soft routing, importance loss",
        moe=dict(expert_type="linear", router="soft", aux_loss_coef=0.0, importance_loss_coef=0.01),
    ),
    "moe-linear": Method(
        "linear experts: each projection routed, E=8 top-2 r=8", moe=dict(expert_type="linear")
    ),
    "moe-mola": Method("MoLA: 2/4/6/8 experts by quarter of depth", moe=dict(num_experts="mola")),
    "moe-task": Method(
        "token+task routing", moe=dict(task_routing="token+task", extra_tasks="tasks"), route_by_task=True
    ),
    "moe-task-only": Method(
        "task routing (MOELoRA): one learned mixture per task, whatever the token",
        moe=dict(task_routing="task", extra_tasks="tasks"),
        route_by_task=True,
    ),
    "moe-bias": Method(
        "aux-loss-free bias balancing instead of the aux loss",
        moe=dict(aux_loss_coef=0.0, bias_update_rate=0.002),
    ),
    "moe-demo": Method("aux loss + bias balancing (the demo's)", moe=dict(bias_update_rate=0.002)),
    "moe-nobalance": Method("no balancing (z-loss only)", moe=dict(aux_loss_coef=0.0)),
    "moe-router-lr10": Method("router learning rate x10", router_lr_multiplier=10.0),
    "moe-top1-r16": Method("E=8 top-1 r=16", moe=dict(top_k=1, r=16, lora_alpha=32)),
    "moe-e16": Method("E=16 top-2 r=8", moe=dict(num_experts=16)),
    "moe-fine": Method("fine-grained: E=32 top-4 r=4", moe=dict(num_experts=32, top_k=4, r=4, lora_alpha=8)),
}
QUICK_METHODS = ("lora-r16", "dora-r16", "moe-default", "moe-task")
SCALING_LORA_RANKS = (8, 16, 32, 64, 128, 256)
SCALING_EXPERTS = (4, 8, 16, 32, 64)


def scaling_method(name: str) -> Method:
    """`scale-lora-r{R}` (alpha 2R) or `scale-moe-e{E}` (top-2, r=8), for the scaling study."""
    kind, _, value = name.removeprefix("scale-").partition("-")
    n = int(value[1:])
    if kind == "lora":
        return Method(f"LoRA r={n}", lora=dict(r=n, lora_alpha=2 * n))
    return Method(f"moetune E={n} top-2 r=8", moe=dict(num_experts=n))


# scaling points that are the same configuration as a method of the comparison: one run serves both
SAME_RUN = {"scale-lora-r16": "lora-r16", "scale-moe-e8": "moe-default"}


def get_method(name: str) -> Method:
    return scaling_method(name) if name.startswith("scale-") else METHODS[name]


# ==================================================================================================
# the protocol
# ==================================================================================================
def protocol(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that must be equal for two runs to be compared; its hash names the runs' protocol."""
    return {
        "model": "tiny-llama" if args.quick else "smollm2",
        "tasks": list(args.tasks),
        "train_per_task": args.train_per_task,
        "val_per_task": args.val_per_task,
        "test_per_task": args.test_per_task,
        "data_seed": 0,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "max_steps": args.max_steps,
        "epochs": 1,
        "warmup_steps": args.warmup_steps,
        "lr_scheduler": "linear",
        "weight_decay": 0.0,
        "lr_grid": list(args.lrs),
        "exact_match": "teacher_forced",
        "batches": "padding-free",
        "logits": "label positions only (padding-free batches)",
        "precision": "bf16 autocast, fp32 weights (training and scoring)",
        # reasoning-gym's isomorphic_strings draws its items by iterating over sets of strings: they
        # change with Python's string-hash seed unless it is fixed (the script re-runs itself so)
        "python_hash_seed": 0,
    }


def protocol_id(proto: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:10]


def training_args(proto: dict[str, Any], lr: float) -> dict[str, Any]:
    training = dict(
        per_device_train_batch_size=proto["batch_size"],
        learning_rate=lr,
        lr_scheduler_type=proto["lr_scheduler"],
        warmup_steps=proto["warmup_steps"],
        num_train_epochs=proto["epochs"],
        weight_decay=proto["weight_decay"],
        logging_steps=10,
        dataloader_drop_last=False,
        disable_tqdm=True,
        bf16=True,
    )
    if proto["max_steps"]:
        training["max_steps"] = proto["max_steps"]
    return training


# ==================================================================================================
# one run (a worker process)
# ==================================================================================================
def load_model_and_splits(proto: dict[str, Any]):
    if proto["model"] == "tiny-llama":
        model, tokenizer = multitask_data.tiny_llama_and_tokenizer()
        splits = multitask_data.toy_splits(
            proto["train_per_task"], proto["val_per_task"], proto["test_per_task"]
        )
        return model, tokenizer, splits
    from moetune.app import demo

    model, tokenizer = demo.load_model(proto["model"])
    splits = multitask_data.build_splits(
        tokenizer,
        proto["train_per_task"],
        proto["val_per_task"],
        proto["test_per_task"],
        seed=proto["data_seed"],
        tasks=tuple(proto["tasks"]),
    )
    return model, tokenizer, splits


def moe_config(method: Method, model_config: Any, tasks: list[str]):
    from moetune.config import MoEConfig

    fields = {**MOE_BASE, **method.moe}
    if fields.get("num_experts") == "mola":
        fields["num_experts"] = _mola(model_config.num_hidden_layers)
    if fields.get("extra_tasks") == "tasks":
        fields["task"], fields["extra_tasks"] = tasks[0], list(tasks[1:])
    return MoEConfig(**fields)


def lora_fields(method: Method, matched_rank: int) -> dict[str, Any]:
    """The method's peft LoraConfig fields, its rank and alpha resolved."""
    fields = dict(method.lora, lora_dropout=MOE_BASE["lora_dropout"], target_modules=PEFT_TARGETS)
    if fields["r"] == "matched":
        fields["r"] = matched_rank
    if fields["lora_alpha"] == "2r":
        fields["lora_alpha"] = 2 * fields["r"]
    return fields


def matched_rank(model_config: Any) -> int:
    """The LoRA rank whose trainable parameter count is closest to moetune's default (meta device)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moetune.model import get_moe_model

    def skeleton():
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config)

    moe = get_moe_model(skeleton(), moe_config(METHODS["moe-default"], model_config, ["t"]))
    per_rank = get_peft_model(
        skeleton(), LoraConfig(r=1, target_modules=PEFT_TARGETS, task_type="CAUSAL_LM")
    ).get_nb_trainable_parameters()[0]
    return max(1, round(moe.get_nb_trainable_parameters()[0] / per_rank))


def train(
    name: str, lr: float, seed: int, proto: dict[str, Any], log=print, max_steps: int = 0, callbacks=()
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Train one method at one learning rate and seed (for `max_steps` steps when > 0, else the
    protocol's), with `callbacks` added to the Trainer's: (model, tokenizer, splits, result)."""
    from transformers import Trainer

    from moetune.app.run import CURATED_DATA, Tasks, fit, trainer_inputs, training_mixture
    from moetune.app.run_config import DataConfig, RunConfig
    from moetune.model import get_moe_model

    method = get_method(name)
    model, tokenizer, splits = load_model_and_splits(proto)
    tasks = list(splits.train)
    cfg = RunConfig(
        model=proto["model"],
        # padding-free batches: the same loss as padded ones without the padding's compute
        data=DataConfig(max_length=proto["max_length"], padding_free=True, **CURATED_DATA),
        training=training_args(proto, lr) | ({"max_steps": max_steps} if max_steps else {}),
        router_lr_multiplier=method.router_lr_multiplier,
        seed=seed,
        route_by_task=method.route_by_task,
    )
    held_out = {t: splits.val[t] + splits.test[t] for t in tasks}
    mixture = training_mixture(cfg, Tasks(splits.train, held_out))  # every method: the same mixture
    torch.manual_seed(seed)
    random.seed(seed)
    output_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"multitask-{os.getpid()}")
    result: dict[str, Any] = {"method": name, "lr": lr, "seed": seed, "data_sha256": splits.fingerprint()}
    start = time.time()
    if method.baseline:
        from peft import LoraConfig, get_peft_model

        result["lora"] = lora_fields(method, matched_rank(model.config))
        model = get_peft_model(model, LoraConfig(**result["lora"], task_type="CAUSAL_LM"))
        inputs = trainer_inputs(tokenizer, cfg, mixture, output_dir)
        trainer = Trainer(model=model, callbacks=list(callbacks), **inputs)
        trainer.train()
    else:
        cfg.moe = moe_config(method, model.config, tasks)
        model = get_moe_model(model, cfg.moe)
        result["moe"] = cfg.moe.to_dict()
        trainer, _ = fit(model, tokenizer, cfg, mixture, output_dir, log, callbacks=callbacks)
    result["train_seconds"] = round(time.time() - start, 1)
    steps = trainer.state.global_step
    result["steps"] = steps
    result["step_seconds"] = round(trainer.state.log_history[-1]["train_runtime"] / steps, 3)
    result["trainable_parameters"] = model.get_nb_trainable_parameters()[0]
    result["train_loss"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result["router_lr_multiplier"] = method.router_lr_multiplier
    return model, tokenizer, splits, result


def run_one(
    name: str, lr: float, seed: int, proto: dict[str, Any], adapter_dir: str | None = None, log=print
) -> dict[str, Any]:
    """Train one method at one learning rate and seed, save its adapter to `adapter_dir` (when given)
    and score every validation item; the test items are scored from the saved adapter (`score_test`)."""
    model, tokenizer, splits, result = train(name, lr, seed, proto, log)
    method = get_method(name)
    if adapter_dir is not None:
        model.save_pretrained(adapter_dir)
    start = time.time()
    result |= score(model, tokenizer, splits, method, "val")
    result["eval_seconds"] = round(time.time() - start, 1)
    log(
        f"{name} lr={lr:g} seed={seed}: val {mean_accuracy(result['val']):.3f} "
        f"({result['train_seconds']:.0f} s training, {result['eval_seconds']:.0f} s validation scoring)"
    )
    return result


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step: forward, backward and update, not the data loading."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.seconds.append(round(time.perf_counter() - self._start, 4))


def time_steps(name: str, lr: float, proto: dict[str, Any], steps: int) -> list[float]:
    """The first `steps` training steps of a method (seed 0), each one's seconds."""
    timer = StepTimer()
    train(name, lr, 0, proto, log=lambda _: None, max_steps=steps, callbacks=[timer])
    return timer.seconds


def untrained_routing(proto: dict[str, Any]) -> dict[str, Any]:
    """moe-default's routing health on the validation split before any training (seed 0): the
    reference for the trained runs' (at initialisation the experts add nothing, so every router sees
    the base model's hidden states through its random weights)."""
    from moetune.model import get_moe_model

    model, tokenizer, splits = load_model_and_splits(proto)
    torch.manual_seed(0)
    model = get_moe_model(model, moe_config(get_method("moe-default"), model.config, list(splits.train)))
    return score(model, tokenizer, splits, get_method("moe-default"), "val")["routing"]


def score_test(name: str, lr: float, seed: int, proto: dict[str, Any], adapter_dir: str) -> dict[str, Any]:
    """The test split scored with the adapter `run_one` saved (the weights it trained, bit for bit)."""
    from moetune.model import MoEModel

    method = get_method(name)
    model, tokenizer, splits = load_model_and_splits(proto)
    if method.baseline:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    else:
        model = MoEModel.from_pretrained(model, adapter_dir, strict=True)
    start = time.time()
    result = score(model, tokenizer, splits, method, "test")
    result["test_data_sha256"] = splits.fingerprint()
    result["test_eval_seconds"] = round(time.time() - start, 1)
    print(f"{name} lr={lr:g} seed={seed}: test {mean_accuracy(result['test']):.3f}", flush=True)
    return result


def score(model, tokenizer, splits, method: Method, split: str) -> dict[str, Any]:
    """Per task, each item's correctness as a string of 0/1 (`{split: {task: "0110..."}}`), and for a
    MoE model its routing health over the split's items (`routing`, `routing_split`)."""
    from moetune.app.evaluation import score_items
    from moetune.core.stats import merge, task_information
    from moetune.model import MoEModel

    result: dict[str, Any] = {split: {}}
    routing = {}
    for task, items in getattr(splits, split).items():
        routed = model.use_tasks([task]) if method.route_by_task else contextlib.nullcontext()
        if isinstance(model, MoEModel):
            model.reset_routing_stats()
        with routed, torch.autocast(model.device.type, dtype=torch.bfloat16):
            correct = score_items(model, tokenizer, items, batch_size=16, exact_match="teacher_forced")
        if isinstance(model, MoEModel):
            routing[task] = model.routing_stats()
        result[split][task] = "".join("1" if c else "0" for c in correct)
    if routing:
        layers = merge(list(routing.values()))
        n = len(layers)
        result["routing"] = {
            key: sum(s[key] for s in layers.values()) / n
            for key in ("effective_experts", "effective_load", "load_cv")
        }
        result["routing"]["dead_experts"] = sum(len(s["dead_experts"]) for s in layers.values())
        # how much a slot's expert tells about its task (bits, mean over layers): 0 = tasks share alike
        result["routing"]["task_information"] = sum(task_information(routing).values()) / n
        result["routing_split"] = split
    return result


def mean_accuracy(per_task: dict[str, str]) -> float:
    """Mean over tasks of the fraction of items answered correctly."""
    return sum(s.count("1") / len(s) for s in per_task.values()) / len(per_task)


# ==================================================================================================
# the sweep: which runs, in which order; each in a fresh process, its JSON under runs_dir
# ==================================================================================================
def run_path(runs_dir: str, name: str, lr: float, seed: int) -> str:
    return os.path.join(runs_dir, name, f"lr{lr:g}-seed{seed}.json")


def load_runs(runs_dir: str, proto_id: str) -> dict[tuple[str, float, int], dict[str, Any]]:
    runs = {}
    if not os.path.isdir(runs_dir):
        return runs
    for method in sorted(os.listdir(runs_dir)):
        folder = os.path.join(runs_dir, method)
        for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if not file.endswith(".json"):
                continue
            with open(os.path.join(folder, file), encoding="utf-8") as fh:
                run = json.load(fh)
            if run.get("protocol_id") == proto_id:
                runs[(run["method"], float(run["lr"]), int(run["seed"]))] = run
    return runs


def adapter_path(args: argparse.Namespace, name: str, lr: float, seed: int) -> str:
    return os.path.join(args.adapters_dir, name, f"lr{lr:g}-seed{seed}")


def ensure_run(
    name: str, lr: float, seed: int, args: argparse.Namespace, state: dict[str, Any], test: bool = False
) -> dict | None:
    """The run's result, from its file or trained now; with `test`, its test split scored too (from
    the adapter the training saved). None once --max-runs new trainings or scorings were made."""
    name = SAME_RUN.get(name, name)
    key = (name, float(lr), seed)
    path = run_path(args.runs_dir, name, lr, seed)
    adapter = adapter_path(args, name, lr, seed)
    run = state["runs"].get(key)
    if run is None:
        if _out_of_budget(args, state):
            return None
        print(f"\n=== {name} lr={lr:g} seed={seed} ===", flush=True)
        start = time.time()
        if args.in_process:
            run = run_one(name, lr, seed, state["protocol"], adapter)
        else:
            run = run_worker(name, lr, seed, args, "train")
        run |= {
            "protocol_id": state["protocol_id"],
            "protocol": state["protocol"],
            "commit": git_commit(),
            "wall_seconds": round(time.time() - start, 1),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        _save_run(path, key, run, state)
    if test and run.get("test") is None:
        if not os.path.isdir(adapter):
            raise SystemExit(
                f"{path}: its test split is not scored and its adapter {adapter} is missing; "
                "delete the run's file to train it again"
            )
        if _out_of_budget(args, state):
            return None
        print(f"\n=== {name} lr={lr:g} seed={seed}: test split ===", flush=True)
        if args.in_process:
            run |= score_test(name, lr, seed, state["protocol"], adapter)
        else:
            run |= run_worker(name, lr, seed, args, "test")
        run["test_commit"] = git_commit()
        _save_run(path, key, run, state)
    return run


def _out_of_budget(args: argparse.Namespace, state: dict[str, Any]) -> bool:
    if args.max_runs is not None and state["new"] >= args.max_runs:
        state["stopped"] = True
    return state["stopped"]


def _save_run(path: str, key: tuple[str, float, int], run: dict[str, Any], state: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text(path, json.dumps(run, indent=1))
    state["runs"][key] = run
    state["new"] += 1


def run_worker(name: str, lr: float, seed: int, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """`run_one` (mode "train"), `score_test` ("test") or `time_steps` ("time") in a fresh process
    (fresh model, RNG, memory)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        command = [sys.executable, os.path.abspath(__file__), *args.argv, "--worker", name]
        command += ["--worker-lr", repr(lr), "--worker-seed", str(seed), "--worker-mode", mode]
        command += ["--result-file", result_file]
        subprocess.run(command, check=True)
        with open(result_file, encoding="utf-8") as fh:
            return json.load(fh)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", HERE, "status", "--porcelain", "--", "."], capture_output=True, text=True
        )
        return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def grid_step(val: dict[float, float], base: int) -> tuple[float, float | None]:
    """(best rate, rate to add next) of a grid, `val`: rate -> validation mean, `base` the rates of
    `--lrs`. Where the best rate (ties: the smaller) sits at an edge the grid extends one factor of 2
    beyond it, twice at most; the next rate is None once the grid is final."""
    lrs = sorted(val)
    best = max(lrs, key=lambda lr: (val[lr], -lr))
    if len(lrs) - base < 2 and best in (lrs[0], lrs[-1]):
        return best, best / 2 if best == lrs[0] else best * 2
    return best, None


def choose_lr(name: str, args: argparse.Namespace, state: dict[str, Any]) -> float | None:
    """The grid phase for one method: its best validation rate (None while runs are missing)."""
    lrs = list(args.lrs)
    while True:
        results = {lr: ensure_run(name, lr, 0, args, state) for lr in sorted(lrs)}
        if any(r is None for r in results.values()):
            return None
        best, extra = grid_step({lr: mean_accuracy(r["val"]) for lr, r in results.items()}, len(args.lrs))
        if extra is None:
            return best
        lrs.append(extra)


def chosen_rates(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, float]:
    """Per method with a final grid: its chosen rate, computed from the runs on disk only."""
    rates = {}
    for name in args.methods:
        grid = {lr: r for (m, lr, s), r in state["runs"].items() if m == name and s == 0}
        if not all(lr in grid for lr in args.lrs):
            continue
        best, extra = grid_step({lr: mean_accuracy(r["val"]) for lr, r in grid.items()}, len(args.lrs))
        if extra is None:  # else the grid extends beyond an edge first
            rates[name] = best
    return rates


def seed_candidates(args: argparse.Namespace, rates: dict[str, float], state: dict[str, Any]) -> list[str]:
    """The baselines and the three best moetune methods by validation accuracy at their chosen rate."""
    val = {m: mean_accuracy(state["runs"][(m, rates[m], 0)]["val"]) for m in rates}
    moe = sorted((m for m in rates if not get_method(m).baseline), key=lambda m: -val[m])[:3]
    return [m for m in rates if get_method(m).baseline] + moe


def sweep(args: argparse.Namespace, state: dict[str, Any]) -> None:
    if args.phase in ("grid", "all"):
        for name in args.methods:
            choose_lr(name, args, state)
    rates = chosen_rates(args, state)
    if args.phase in ("seeds", "all"):
        if not os.path.exists(untrained_path(args)) and not _out_of_budget(args, state):
            print("\n=== moe-default untrained: routing on the validation split ===", flush=True)
            if args.in_process:
                routing = untrained_routing(protocol(args))
            else:
                routing = run_worker("moe-default", 0, 0, args, "untrained")
            os.makedirs(args.results_dir, exist_ok=True)
            write_text(untrained_path(args), json.dumps(routing | {"commit": git_commit()}, indent=1))
            state["new"] += 1
        for name in rates:  # the test split of every method at its chosen rate
            ensure_run(name, rates[name], 0, args, state, test=True)
        for name in seed_candidates(args, rates, state):
            for seed in args.seeds[1:]:
                ensure_run(name, rates[name], seed, args, state, test=True)
    if args.phase in ("scaling", "all"):
        for name in scaling_names(args):
            anchor = "lora-r16" if name.startswith("scale-lora") else "moe-default"
            if anchor in rates:
                ensure_run(name, rates[anchor], 0, args, state, test=True)
    names = seed_candidates(args, rates, state) if rates else []
    if args.timing_methods:
        names = [m for m in args.timing_methods if m in rates]
    timed = load_timing(args)
    if args.phase == "timing" or (args.phase == "all" and not state["stopped"] and set(names) - set(timed)):
        time_methods(names, rates, args)


def untrained_path(args: argparse.Namespace) -> str:
    return os.path.join(args.results_dir, "untrained_routing.json")


def timing_path(args: argparse.Namespace) -> str:
    return os.path.join(args.results_dir, "timing.json")


def load_timing(args: argparse.Namespace) -> dict[str, float]:
    """Per timed method, the median of its kept steps (every round's steps after the first
    `--timing-skip`)."""
    if not os.path.exists(timing_path(args)):
        return {}
    with open(timing_path(args), encoding="utf-8") as fh:
        data = json.load(fh)
    skip = data["skipped_steps"]
    return {
        name: statistics.median(t for r in rounds for t in r["seconds"][skip:])
        for name, rounds in data["methods"].items()
    }


def time_methods(names: list[str], rates: dict[str, float], args: argparse.Namespace) -> None:
    """The training step time of `names` measured apart from the sweep: `--timing-rounds` rounds, each
    running every method once for `--timing-steps` steps in a fresh process, so a drift of the machine
    hits every method alike. Meant for an otherwise idle machine (the runs' own times are not: the
    sweep shares it with other work); each measurement records the load average before it."""
    data: dict[str, Any] = {
        "commit": git_commit(),
        "steps": args.timing_steps,
        "skipped_steps": args.timing_skip,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "methods": {name: [] for name in names},
    }
    for round_ in range(args.timing_rounds):
        for name in names:
            print(f"\n=== timing {name}, round {round_ + 1}/{args.timing_rounds} ===", flush=True)
            load = os.getloadavg()[0]
            if args.in_process:
                seconds = time_steps(name, rates[name], protocol(args), args.timing_steps)
            else:
                seconds = run_worker(name, rates[name], 0, args, "time")["step_seconds"]
            data["methods"][name].append({"seconds": seconds, "load_before": load})
    os.makedirs(args.results_dir, exist_ok=True)
    write_text(timing_path(args), json.dumps(data, indent=1))


def scaling_names(args: argparse.Namespace) -> list[str]:
    return [f"scale-lora-r{r}" for r in args.scaling_ranks] + [
        f"scale-moe-e{e}" for e in args.scaling_experts
    ]


# ==================================================================================================
# the report
# ==================================================================================================
def correctness(run: dict[str, Any], split: str = "test") -> dict[str, list[int]]:
    return {task: [c == "1" for c in s] for task, s in run[split].items()}


def paired_bootstrap(
    ours: list[dict[str, str]], theirs: list[dict[str, str]], replicates: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean-over-tasks accuracy difference (ours - theirs) and its 95% percentile interval.

    ours[s][task] / theirs[s][task]: per-item correctness strings of seed s on the same test items.
    Each replicate resamples the seeds and, within each task, the items, and applies the same draw to
    both methods (paired).
    """
    import numpy as np

    tasks = list(ours[0])
    diff = {  # (seeds, items) per task: +1, 0 or -1
        t: np.array(
            [
                [int(a) - int(b) for a, b in zip(o[t], h[t], strict=True)]
                for o, h in zip(ours, theirs, strict=True)
            ]
        )
        for t in tasks
    }
    point = float(np.mean([d.mean() for d in diff.values()]))
    rng = np.random.default_rng(seed)
    S = len(ours)
    stats = np.empty(replicates)
    for i in range(replicates):
        seeds = rng.integers(0, S, S)
        stats[i] = np.mean(
            [d[seeds][:, rng.integers(0, d.shape[1], d.shape[1])].mean() for d in diff.values()]
        )
    low, high = np.percentile(stats, [2.5, 97.5])
    return point, float(low), float(high)


def summarise(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    """Per method at its chosen rate: accuracies, cost, routing; the comparison to the best baseline."""
    runs = state["runs"]
    seen = {
        (key, run.get(field))
        for key, run in runs.items()
        for field in ("data_sha256", "test_data_sha256")
        if field in run
    }
    if len({sha for _, sha in seen}) > 1:
        raise SystemExit(f"the runs did not all see the same data: {sorted(seen, key=str)}")
    rates = chosen_rates(args, state)
    timed = load_timing(args)
    table: dict[str, Any] = {}
    pending: dict[str, Any] = {}
    for name, lr in rates.items():
        grid = {
            f"{rate:g}": mean_accuracy(r["val"])
            for (m, rate, s), r in sorted(runs.items())
            if m == name and s == 0
        }
        seeds = [s for s in args.seeds if runs.get((name, lr, s), {}).get("test") is not None]
        if not seeds:  # the grid is done, the test split not scored yet
            pending[name] = {"label": get_method(name).label, "lr": lr, "val_by_lr": grid}
            continue
        rs = [runs[(name, lr, s)] for s in seeds]
        tasks = list(rs[0]["test"])
        table[name] = {
            "label": get_method(name).label,
            "baseline": get_method(name).baseline,
            "lr": lr,
            "val_by_lr": grid,
            "seeds": seeds,
            "val_mean": mean_accuracy(rs[0]["val"]),
            "test_mean_per_seed": [mean_accuracy(r["test"]) for r in rs],
            "test_mean": sum(mean_accuracy(r["test"]) for r in rs) / len(rs),
            "test_by_task": {
                t: sum(r["test"][t].count("1") / len(r["test"][t]) for r in rs) / len(rs) for t in tasks
            },
            "trainable_parameters": rs[0]["trainable_parameters"],
            "step_seconds": timed.get(name, sorted(r["step_seconds"] for r in rs)[len(rs) // 2]),
            "step_seconds_timed": name in timed,
            "routing": rs[0].get("routing"),
        }
    baselines = [m for m in table if table[m]["baseline"]]
    best = max(baselines, key=lambda m: table[m]["val_mean"]) if baselines else None
    for name, row in table.items():
        if best is None or row["baseline"]:
            continue
        common = [s for s in row["seeds"] if s in table[best]["seeds"]]
        ours = [runs[(name, row["lr"], s)]["test"] for s in common]
        theirs = [runs[(best, table[best]["lr"], s)]["test"] for s in common]
        point, low, high = paired_bootstrap(ours, theirs)
        row["vs_best_baseline"] = {
            "baseline": best,
            "seeds": common,
            "difference": point,
            "ci95": [low, high],
            # from the timing phase when both were timed there, else from the runs' own times
            "step_time_ratio": row["step_seconds"] / table[best]["step_seconds"],
            "step_time_ratio_timed": row["step_seconds_timed"] and table[best]["step_seconds_timed"],
        }
    scaling = {}
    for name in scaling_names(args):
        anchor = "lora-r16" if name.startswith("scale-lora") else "moe-default"
        run = runs.get((SAME_RUN.get(name, name), rates.get(anchor, -1.0), 0))
        if run is not None and run.get("test") is not None:
            scaling[name] = {
                "trainable_parameters": run["trainable_parameters"],
                "test_mean": mean_accuracy(run["test"]),
                "val_mean": mean_accuracy(run["val"]),
                "step_seconds": run["step_seconds"],
            }
    untrained = None
    if os.path.exists(untrained_path(args)):
        with open(untrained_path(args), encoding="utf-8") as fh:
            untrained = json.load(fh)
    return {
        "best_baseline": best,
        "methods": table,
        "pending": pending,
        "scaling": scaling,
        "untrained_routing": untrained,
    }


def markdown(summary: dict[str, Any], proto: dict[str, Any], proto_id: str) -> str:
    table, pending = summary["methods"], summary.get("pending", {})
    if not table and not pending:
        return "No method has finished its learning-rate grid yet.\n"
    pending_lines = [
        f"- {name}: {row['label']}; chosen {row['lr']:g}; validation mean by rate: "
        + ", ".join(f"{lr}: {100 * v:.1f}" for lr, v in row["val_by_lr"].items())
        for name, row in pending.items()
    ]
    if pending_lines:
        pending_lines = ["", "Grid done, test split not scored yet:", "", *pending_lines]
    if not table:
        return "\n".join(pending_lines[1:]) + "\n"
    tasks = list(next(iter(table.values()))["test_by_task"])
    best = summary["best_baseline"]
    lines = [
        f"Protocol `{proto_id}`: {len(tasks)} tasks, {proto['train_per_task']} training examples per task "
        f"(batch {proto['batch_size']}, one epoch), {proto['val_per_task']} validation and "
        f"{proto['test_per_task']} test items per task; learning rate chosen on validation from "
        f"{', '.join(f'{x:g}' for x in proto['lr_grid'])} (extended at an edge). Accuracy in %, test "
        "split, mean over the seeds listed.",
        "",
        "| method | lr | seeds | val mean | test mean (per seed) | Δ vs best baseline [95% CI] | "
        "trainable | s/step | eff. experts |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(table, key=lambda m: (not table[m]["baseline"], -table[m]["val_mean"]))
    for name in order:
        row = table[name]
        per_seed = ", ".join(f"{100 * x:.1f}" for x in row["test_mean_per_seed"])
        vs = row.get("vs_best_baseline")
        delta = (
            f"{100 * vs['difference']:+.1f} [{100 * vs['ci95'][0]:+.1f}, {100 * vs['ci95'][1]:+.1f}]"
            if vs
            else ("(best baseline)" if name == best else "")
        )
        routing = row.get("routing")
        eff = f"{routing['effective_experts']:.2f} / {routing['effective_load']:.2f}" if routing else ""
        if routing and "task_information" in routing:
            eff += f" / {routing['task_information']:.2f} bits"
        lines.append(
            f"| {name}: {row['label']} | {row['lr']:g} | {len(row['seeds'])} | {100 * row['val_mean']:.1f} | "
            f"**{100 * row['test_mean']:.1f}** ({per_seed}) | {delta} | "
            f"{row['trainable_parameters'] / 1e6:.2f} M | "
            f"{row['step_seconds']:.2f}{'' if row['step_seconds_timed'] else '*'} | {eff} |"
        )
    lines += ["", "Per task (test accuracy in %, mean over seeds):", ""]
    lines.append("| method | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---|" * len(tasks))
    for name in order:
        cells = " | ".join(f"{100 * table[name]['test_by_task'][t]:.1f}" for t in tasks)
        lines.append(f"| {name} | {cells} |")
    lines += ["", "Validation mean by learning rate (seed 0):", ""]
    for name in order:
        grid = ", ".join(f"{lr}: {100 * v:.1f}" for lr, v in table[name]["val_by_lr"].items())
        lines.append(f"- {name}: {grid}")
    if summary["scaling"]:
        lines += [
            "",
            "Scaling (seed 0, test mean in %):",
            "",
            "| run | trainable | test mean | val mean | s/step |",
        ]
        lines.append("|---|---|---|---|---|")
        for name, s in summary["scaling"].items():
            lines.append(
                f"| {name} | {s['trainable_parameters'] / 1e6:.2f} M | {100 * s['test_mean']:.1f} | "
                f"{100 * s['val_mean']:.1f} | {s['step_seconds']:.2f} |"
            )
    lines += pending_lines
    untrained = summary.get("untrained_routing")
    if untrained:
        lines += [
            "",
            "moe-default before training (its routers at initialisation, validation split): "
            f"{untrained['effective_experts']:.2f} / {untrained['effective_load']:.2f} / "
            f"{untrained['task_information']:.2f} bits.",
        ]
    lines += [
        "",
        "eff. experts: effective experts per token / of the load on the test items (exp of an entropy, "
        "mean over layers; E = even, 1 = collapse) / the mutual information of a slot's task and expert "
        "(bits, mean over layers; 0 = every task spreads over the experts alike). s/step: median step "
        "of the timing phase (interleaved rounds, fresh processes); * the median over seeds of the runs' "
        "own, on a machine shared with other work.",
    ]
    return "\n".join(lines) + "\n"


def plot_scaling(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix, label, marker in (
        ("scale-lora", "LoRA, ranks", "o"),
        ("scale-moe", "moetune, E experts", "s"),
    ):
        points = sorted(
            (s["trainable_parameters"], s["test_mean"], n)
            for n, s in summary["scaling"].items()
            if n.startswith(prefix)
        )
        if points:
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker=marker, label=label)
            for x, y, n in points:
                ax.annotate(
                    n.rsplit("-", 1)[1], (x, 100 * y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("mean test accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def report(args: argparse.Namespace, state: dict[str, Any]) -> str:
    summary = summarise(args, state)
    text = markdown(summary, state["protocol"], state["protocol_id"])
    data = {
        "command": " ".join(["python", "benchmarks/multitask.py", *args.argv]),
        "protocol_id": state["protocol_id"],
        "protocol": state["protocol"],
        "methods": {name: dataclasses.asdict(get_method(name)) for name in args.methods},
        "summary": summary,
        "runs": [
            {k: v for k, v in run.items() if k != "protocol"} for key, run in sorted(state["runs"].items())
        ],
        "python": platform.python_version(),
    }
    os.makedirs(args.results_dir, exist_ok=True)
    write_outputs(
        os.path.join(args.results_dir, "multitask.json"),
        data,
        os.path.join(args.results_dir, "multitask.md"),
        text,
        1,
    )
    if summary["scaling"]:
        plot_scaling(summary, os.path.join(args.results_dir, "scaling.png"))
    return text


# ==================================================================================================
# main
# ==================================================================================================
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="moetune's MoE-LoRA configurations against tuned LoRA, rsLoRA and DoRA on 11 tasks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--phase", default="all", choices=("grid", "seeds", "scaling", "timing", "report", "all")
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset, in run order")
    parser.add_argument(
        "--results-dir", default=os.path.join(HERE, "results", "multitask"), help="tables and JSON"
    )
    parser.add_argument("--runs-dir", default=None, help="one JSON per run (default: RESULTS_DIR/runs)")
    parser.add_argument(
        "--adapters-dir",
        default=None,
        help="each run's trained adapter, for scoring its test split later (default: RESULTS_DIR/adapters)",
    )
    parser.add_argument(
        "--max-runs", type=int, default=None, help="stop after this many new trainings or test scorings"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, 2 toy tasks, 2 steps, in one process"
    )
    parser.add_argument("--in-process", action="store_true", help="run every configuration in this process")
    parser.add_argument("--train-per-task", type=int, default=64)
    parser.add_argument("--val-per-task", type=int, default=40)
    parser.add_argument("--test-per-task", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=0, help="0 = one epoch")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--lrs", default="5e-4,1e-3,2e-3", help="the learning-rate grid")
    parser.add_argument("--seeds", default="0,1,2", help="seed 0 for the grid, the others at the chosen rate")
    parser.add_argument("--timing-rounds", type=int, default=3, help="timing phase: rounds over the methods")
    parser.add_argument(
        "--timing-steps", type=int, default=10, help="timing phase: steps per method and round"
    )
    parser.add_argument(
        "--timing-skip", type=int, default=2, help="timing phase: first steps of each round not counted"
    )
    parser.add_argument(
        "--timing-methods",
        default="",
        help="timing phase: these methods (with a finished grid) instead of the baselines and the three "
        "best candidates",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--worker-seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--worker-mode", choices=("train", "test", "time", "untrained"), help=argparse.SUPPRESS
    )
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed {list(METHODS)}")
    args.lrs = tuple(float(x) for x in args.lrs.split(","))
    args.seeds = tuple(int(x) for x in args.seeds.split(","))
    args.timing_methods = [m.strip() for m in args.timing_methods.split(",") if m.strip()]
    args.tasks = multitask_data.TASKS
    args.scaling_ranks, args.scaling_experts = SCALING_LORA_RANKS, SCALING_EXPERTS
    if args.quick:
        args.in_process = True
        if args.methods == list(METHODS):
            args.methods = list(QUICK_METHODS)
        args.tasks = multitask_data.TOY_TASKS
        args.train_per_task, args.val_per_task, args.test_per_task = 16, 6, 8
        args.max_steps, args.warmup_steps, args.max_length = 2, 0, 64
        args.scaling_ranks, args.scaling_experts = (4, 8), (2, 4)
        args.timing_rounds, args.timing_steps, args.timing_skip = 1, 3, 1
    args.runs_dir = args.runs_dir or os.path.join(args.results_dir, "runs")
    args.adapters_dir = args.adapters_dir or os.path.join(args.results_dir, "adapters")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proto = protocol(args)
    if args.worker:
        adapter = adapter_path(args, args.worker, args.worker_lr, args.worker_seed)
        if args.worker_mode == "train":
            result = run_one(args.worker, args.worker_lr, args.worker_seed, proto, adapter)
        elif args.worker_mode == "untrained":
            result = untrained_routing(proto)
        elif args.worker_mode == "time":
            result = {"step_seconds": time_steps(args.worker, args.worker_lr, proto, args.timing_steps)}
        else:
            result = score_test(args.worker, args.worker_lr, args.worker_seed, proto, adapter)
        with open(args.result_file, "w", encoding="utf-8") as fh:
            json.dump(result, fh, default=str)
        return 0
    state = {
        "protocol": proto,
        "protocol_id": protocol_id(proto),
        "runs": load_runs(args.runs_dir, protocol_id(proto)),
        "new": 0,
        "stopped": False,
    }
    print(f"protocol {state['protocol_id']}: {len(state['runs'])} runs on disk", flush=True)
    if args.phase != "report":
        sweep(args, state)
    # the report covers every method with runs on disk, whatever this call's --methods
    on_disk = {name for name, _, _ in state["runs"]}
    args.methods = [name for name in METHODS if name in args.methods or name in on_disk]
    text = report(args, state)
    print("\n" + text, flush=True)
    if state["stopped"]:
        print(f"stopped after {args.max_runs} new runs (--max-runs); run again to go on", flush=True)
    return 0


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # see protocol(): the data depend on the hash seed
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    sys.exit(main())
