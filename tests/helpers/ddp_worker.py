"""Worker of tests/test_distributed.py: trains a tiny llama MoE model with MoETrainer, once per run spec.

    python tests/helpers/ddp_worker.py OUT SPEC [SPEC ...]                  # one process
    torchrun --nproc_per_node 2 --standalone tests/helpers/ddp_worker.py OUT SPEC ...
    torchrun --nproc_per_node 2 --standalone tests/helpers/ddp_worker.py --fsdp OUT SPEC ...

SPEC is `case:per_device_batch:grad_accum:log_steps` with `case` a key of CASES and log_steps 0 for
no step logs. Each rank writes `OUT/<case>-b<per_device_batch>-ga<grad_accum>-log<log_steps>/rank<r>/`:
the adapter before training (`init/`) and after it (`save_pretrained`), and `run.json`: world size,
optimizer steps, the step logs and the all-reduced routing statistics since the last log.

Everything that could differ between ranks or between world sizes is fixed: the adapter is
initialised from one seed, dropout and router jitter are 0 (no per-rank randomness), and the data
order is sequential (see `train`).

`--deepspeed` trains through MoETrainer under DeepSpeed (CPU accelerator, gloo): each SPEC is prefixed
with the ZeRO stage, `2/plain:2:1:0` or `3/plain:2:1:0`; the run directory is `zero<stage>-...`. ZeRO-3
loads the base with `from_pretrained` inside DeepSpeed's `zero.Init` (partitioned before moetune injects
its layers) and keeps no parameter whole (`stage3_param_persistence_threshold: 0`). Besides the files
above: the adapter written by `trainer.save_model` (`trainer-save/`, main process only), and with
`resume` in the case name (`3/resume-plain:2:1:0`) a second run resumed from the checkpoint of step 3.

`--fsdp` shards the model with FSDP2 (`torch.distributed.fsdp.fully_shard`, one unit per decoder layer
and one at the root) and trains it in a plain loop (`train_fsdp`) with the Trainer's arithmetic: the
Trainer's `fsdp` option does not shard on CPU (accelerate 1.15 keeps the FSDP plugin only for
accelerator devices; on CPU it silently falls back to DDP), so it cannot test FSDP here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `tests.` and `moetune` as a script

import moetune  # noqa: E402
from moetune.io.adapter import WEIGHTS_NAME, adapter_state_dict, load_adapter_weights  # noqa: E402
from moetune.train.trainer import MoETrainer  # noqa: E402
from tests.helpers.tiny_models import tiny_model  # noqa: E402

ROWS, SEQ = 20, 10  # 20 rows = 5 optimizer steps of a global batch of 4 rows
LR = 0.1
NO_BALANCE = dict(aux_loss_coef=0.0, z_loss_coef=0.0, importance_loss_coef=0.0)
BASE = dict(num_experts=4, top_k=2, r=4, lora_dropout=0.0, router_jitter=0.0, attn_r=2)
CASES: dict[str, dict[str, Any]] = {
    "plain": BASE | NO_BALANCE,  # no balance loss, no bias: plain data parallelism
    "bias": BASE | NO_BALANCE | dict(bias_update_rate=0.05),  # aux-loss-free bias (all-reduced counts)
    "balance": BASE | dict(aux_loss_coef=0.5, z_loss_coef=0.05, bias_update_rate=0.05),  # per-rank losses
}


def dataset() -> Dataset:
    """ROWS rows of SEQ tokens; row i has i % 4 padded positions, so ranks see unequal token counts."""
    ids_NS = torch.randint(3, 127, (ROWS, SEQ), generator=torch.Generator().manual_seed(0))
    mask_NS = torch.ones(ROWS, SEQ, dtype=torch.long)
    for i in range(ROWS):
        if i % 4:
            mask_NS[i, -(i % 4) :] = 0
    labels_NS = ids_NS.masked_fill(mask_NS == 0, -100)
    return Dataset.from_dict(
        {"input_ids": ids_NS.tolist(), "attention_mask": mask_NS.tolist(), "labels": labels_NS.tolist()}
    )


def deepspeed_config(stage: int) -> dict[str, Any]:
    """examples/deepspeed/zero<stage>.json (batch sizes, clipping and precision from the TrainingArguments;
    no `optimizer` section, so the Trainer builds MoETrainer's optimizer with its router group), with
    ZeRO-3 keeping no parameter whole, however small (the tiny model's would all stay whole)."""
    config = json.loads((ROOT / "examples" / "deepspeed" / f"zero{stage}.json").read_text())
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def _init_deepspeed(cuda: bool) -> None:
    """DeepSpeed's distributed layer up before `zero.Init` reads the world size; on CPU with gloo alone,
    without the shared-memory all-reduce op it would compile first (~2 minutes)."""
    import deepspeed
    import deepspeed.comm.torch

    if not cuda:
        deepspeed.comm.torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")


def train(
    out: Path,
    case: str,
    per_device: int,
    grad_accum: int,
    log_steps: int,
    zero_stage: int = 0,
    cuda: bool = False,
) -> None:
    """One run of MoETrainer (DDP under torchrun; FSDP when `accelerate launch` says so; DeepSpeed with
    `zero_stage`), on the CPU with gloo or on the GPU (`cuda`)."""
    distributed = "LOCAL_RANK" in os.environ  # launched by torchrun or accelerate
    rank = int(os.environ.get("RANK", 0))
    target = out / f"rank{rank}"
    resume = case.startswith("resume-")
    case = case.removeprefix("resume-")
    if zero_stage:
        _init_deepspeed(cuda)
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        # The global batch is the same by construction: a sequential sampler, and accelerate shards
        # the per-device batches round-robin (rank r takes batches r, r + W, ...). With 2 ranks x 2 rows,
        # step s uses rows 4s..4s+3 (rank 0: 4s, 4s+1; rank 1: 4s+2, 4s+3), exactly the rows of the
        # 1-process batch of 4 (or of its 2 accumulated micro-batches of 2, in that order). A
        # DistributedSampler-style random split would give each step other rows than one process sees.
        train_sampling_strategy="sequential",
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=1,
        # Plain SGD without clipping: the update is lr x gradient, so a mis-scaled loss (e.g. by the
        # world size) shows up in full. Adam is invariant to a constant loss scale and turns float
        # rounding in near-zero gradients into differences up to ~lr x 1e-2 (seen: 2e-5 at lr 1e-2):
        # it would hide bugs behind a loose tolerance.
        optim="sgd",
        learning_rate=LR,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        # the token-weighted loss of the global batch: num_items_in_batch is summed over ranks (default True)
        average_tokens_across_devices=True,
        # a log resets the routing statistics; without one they cover the whole run
        logging_strategy="steps" if log_steps else "no",
        logging_steps=log_steps or 500,
        save_strategy="steps" if resume else "no",
        save_steps=3,
        report_to=[],
        use_cpu=not cuda,
        # CPU: "gloo" under torchrun (without it, a 1-process "group" fails); GPU: nccl
        ddp_backend="gloo" if distributed and not cuda else None,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        deepspeed=deepspeed_config(zero_stage) if zero_stage else None,
    )
    model, trainer = _model_and_trainer(case, args, target, zero_stage)
    trainer.train()
    run: dict[str, Any] = {}
    if zero_stage or trainer.is_fsdp_enabled:
        trainer.save_model(str(out / "trainer-save"))  # every rank: the adapter is gathered
        run["local_fraction"] = _zero_local_fraction(model)
        run["wrapped"] = type(trainer.model_wrapped).__name__  # DeepSpeedEngine, FSDPMoEModel
    if resume:  # again from the complete checkpoint of step 3: the DeepSpeed engine state comes back
        torch.distributed.barrier()
        if rank == 0:
            shutil.rmtree(Path(args.output_dir) / "checkpoint-5")
        torch.distributed.barrier()
        model, trainer = _model_and_trainer(case, args, None, zero_stage)
        trainer.train(resume_from_checkpoint=True)
        run["resumed_steps"] = trainer.state.global_step - 3
    model.save_pretrained(target)
    run |= {
        "world_size": args.world_size,
        "steps": trainer.state.global_step,
        "logs": [log for log in trainer.state.log_history if "loss" in log],  # the step logs
        "routing": model.routing_stats(),  # all-reduced: a collective call on every rank
    }
    (target / "run.json").write_text(json.dumps(run))


def _model_and_trainer(
    case: str, args: TrainingArguments, target: Path | None, zero_stage: int
) -> tuple[moetune.MoEModel, MoETrainer]:
    """The tiny llama with the case's adapter (its state before training saved to `target/init`)."""
    base = tiny_model("llama")
    if zero_stage == 3:  # partitioned while it loads (DeepSpeed's zero.Init, as transformers does it)
        base_dir = Path(args.output_dir).parent / "base"
        base.save_pretrained(base_dir)  # written by rank 0 alone (transformers' rule under torch.distributed)
        torch.distributed.barrier()
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        assert base.model.layers[0].mlp.up_proj.weight.numel() == 0, "zero.Init did not partition the base"
    torch.manual_seed(1)  # the adapter's initialisation: the same on every rank and in every world size
    model = moetune.get_moe_model(base, moetune.MoEConfig(**CASES[case]))
    if target is not None:
        model.save_pretrained(target / "init")
    if zero_stage:  # accelerate takes a DeepSpeed plugin only in the process's first Accelerator
        AcceleratorState._reset_state()
    return model, MoETrainer(model=model, args=args, train_dataset=dataset())


def _zero_local_fraction(model: moetune.MoEModel) -> float:
    """Of the trained elements, the fraction this rank holds (ZeRO-3: its partitions; FSDP2: its shards)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    local = sum(
        p.ds_tensor.numel()
        if hasattr(p, "ds_tensor")
        else p.to_local().numel()
        if hasattr(p, "to_local")
        else p.numel()
        for p in trained
    )
    return local / sum(getattr(p, "ds_numel", p.numel()) for p in trained)


def train_fsdp(out: Path, case: str, per_device: int, grad_accum: int, log_steps: int) -> None:
    """FSDP2 in a plain loop: what `train` does with the Trainer (sequential rows, SGD, constant lr).

    Rank r of W takes the same rows as under the Trainer (per-device batches round-robin). The loss is
    the token sum of the rank's rows over the global token count, times W: FSDP's reduce-scatter
    averages the gradients, so the update is that of the global batch's token mean (the Trainer does
    the same with `average_tokens_across_devices`). Only `grad_accum=1` and no logs.
    """
    from torch.distributed.fsdp import fully_shard

    assert grad_accum == 1 and log_steps == 0, "the FSDP loop has no accumulation and no logs"
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(**CASES[case]))
    target = out / f"rank{rank}"
    model.save_pretrained(target / "init")
    for layer in model.base_model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    data = dataset()
    step_rows = per_device * world
    steps = len(data) // step_rows
    for step in range(steps):
        rows = range(step * step_rows, (step + 1) * step_rows)
        batch = {k: torch.tensor(data[list(rows)][k]) for k in ("input_ids", "attention_mask", "labels")}
        global_tokens = int((batch["labels"][:, 1:] != -100).sum())  # causal LM: labels shifted by one
        mine = {k: v[rank * per_device : (rank + 1) * per_device] for k, v in batch.items()}
        output = model(**mine, num_items_in_batch=torch.tensor(global_tokens))
        (output.loss * world).backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = [p for p in model.parameters() if p.requires_grad]
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in trained)
    model.save_pretrained(target)  # gathers the sharded adapter tensors: a collective on every rank
    routing = model.routing_stats()
    # loading into the sharded model (as MoETrainer resumes): each rank's shards take the saved values
    load_adapter_weights(model, target / "init")
    init = load_file(str(target / "init" / WEIGHTS_NAME))
    reloaded = adapter_state_dict(model)  # gathered again
    run = {
        "world_size": world,
        "steps": steps,
        "logs": [],
        "routing": routing,
        "reload_equals_init": all(torch.equal(reloaded[k], init[k]) for k in init),
        "class": type(model).__name__,  # FSDPMoEModel: fully_shard swaps the class, no wrapper module
        "local_fraction": local / sum(p.numel() for p in trained),  # of the trained elements on this rank
    }
    (target / "run.json").write_text(json.dumps(run))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 in a plain loop (no Trainer)")
    parser.add_argument("--deepspeed", action="store_true", help="SPECs start with the ZeRO stage: 3/...")
    parser.add_argument("--cuda", action="store_true", help="on the GPU (default: CPU, gloo)")
    parser.add_argument("out", type=Path)
    parser.add_argument("specs", nargs="+", metavar="SPEC")
    opts = parser.parse_args(argv)
    for spec in opts.specs:
        stage, spec = spec.split("/") if opts.deepspeed else ("0", spec)
        case, per_device, grad_accum, log_steps = spec.split(":")
        name = f"{case}-b{per_device}-ga{grad_accum}-log{log_steps}"
        numbers = int(per_device), int(grad_accum), int(log_steps)
        if opts.fsdp:
            train_fsdp(opts.out / name, case, *numbers)
        else:
            run_dir = opts.out / (f"zero{stage}-{name}" if opts.deepspeed else name)
            train(run_dir, case, *numbers, zero_stage=int(stage), cuda=opts.cuda)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
