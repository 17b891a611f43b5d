"""Worker of tests/test_distributed.py: trains a tiny llama MoE model with MoETrainer, once per run spec.

    python tests/ddp_worker.py OUT SPEC [SPEC ...]                         # one process
    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/ddp_worker.py OUT SPEC ...
    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/ddp_worker.py --fsdp OUT SPEC ...

SPEC is `case:per_device_batch:grad_accum:log_steps` with `case` a key of CASES and log_steps 0 for
no step logs. Each rank writes `OUT/<case>-b<per_device_batch>-ga<grad_accum>-log<log_steps>/rank<r>/`:
the adapter before training (`init/`) and after it (`save_pretrained`), and `run.json`: world size,
optimizer steps, the step logs and the all-reduced routing statistics since the last log.

Everything that could differ between ranks or between world sizes is fixed: the adapter is
initialised from one seed, dropout and router jitter are 0 (no per-rank randomness), and the data
order is sequential (see `train`).

`--fsdp` shards the model with FSDP2 (`torch.distributed.fsdp.fully_shard`, one unit per decoder layer
and one at the root) and trains it in a plain loop (`train_fsdp`) with the Trainer's arithmetic: the
Trainer's `fsdp` option does not shard on CPU (accelerate 1.15 keeps the FSDP plugin only for
accelerator devices; on CPU it silently falls back to DDP), so it cannot test FSDP here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests.` and `moetune` as a script

import moetune  # noqa: E402
from moetune.training import MoETrainer  # noqa: E402
from tests.tiny_models import tiny_model  # noqa: E402

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


def train(out: Path, case: str, per_device: int, grad_accum: int, log_steps: int) -> None:
    distributed = "LOCAL_RANK" in os.environ  # launched by torchrun
    torch.manual_seed(1)  # the adapter's initialisation: the same on every rank and in every world size
    model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(**CASES[case]))
    target = out / f"rank{int(os.environ.get('RANK', 0))}"
    model.save_pretrained(target / "init")
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
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if distributed else None,  # "gloo" without torchrun: a 1-process "group" fails
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = MoETrainer(model=model, args=args, train_dataset=dataset())
    trainer.train()
    model.save_pretrained(target)
    run = {
        "world_size": args.world_size,
        "steps": trainer.state.global_step,
        "logs": [log for log in trainer.state.log_history if "loss" in log],  # the step logs
        "routing": model.routing_stats(),  # all-reduced: a collective call on every rank
    }
    (target / "run.json").write_text(json.dumps(run))


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
    run = {
        "world_size": world,
        "steps": steps,
        "logs": [],
        "routing": model.routing_stats(),
        "class": type(model).__name__,  # FSDPMoEModel: fully_shard swaps the class, no wrapper module
        "local_fraction": local / sum(p.numel() for p in trained),  # of the trained elements on this rank
    }
    (target / "run.json").write_text(json.dumps(run))


def main(argv: list[str]) -> None:
    fsdp = argv[0] == "--fsdp"
    out, specs = Path(argv[int(fsdp)]), argv[int(fsdp) + 1 :]
    for spec in specs:
        case, per_device, grad_accum, log_steps = spec.split(":")
        run_dir = out / f"{case}-b{per_device}-ga{grad_accum}-log{log_steps}"
        (train_fsdp if fsdp else train)(run_dir, case, int(per_device), int(grad_accum), int(log_steps))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
