"""DeepSpeed ZeRO-2 and ZeRO-3 through MoETrainer: 2 processes on CPU (DeepSpeed's CPU accelerator, gloo).

One `torchrun --nproc_per_node 2` subprocess of tests/helpers/ddp_worker.py (`--deepspeed`) trains the
tiny llama of tests/train/test_distributed.py (5 steps, global batch 4 rows, plain SGD) under ZeRO-2,
under ZeRO-3 (base loaded inside `zero.Init`, no parameter kept whole), each resumed from its checkpoint
of step 3, and under ZeRO-3 with balance losses; the 1-process references run in this process without
DeepSpeed.

The tolerance is test_distributed's ATOL (1e-6; measured 2.5e-8 under ZeRO-2, 3.9e-8 under ZeRO-3 and
6.1e-8 with balance losses: the same sums in another order).

ZeRO-3 is the case that could break: moetune's layers read their experts' stacked A/B and the router's
weight blocks (children whose forward never runs) inside their own forward, and DeepSpeed gathers a
module's own parameters only. DeepSpeed gathers such a parameter on first access within the engine's
forward and registers it with the running module (`moetune.core.sharding`). The adapter saved by
`trainer.save_model` and `save_pretrained` is gathered from the partitions, with the base fingerprint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import moetune
from moetune.io.adapter import WEIGHTS_NAME, adapter_state_dict
from tests.helpers import ddp_worker
from tests.helpers.distributed import ATOL, load_run, max_diff, torchrun
from tests.helpers.tiny_models import tiny_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install deepspeed)"
)

# stage/case:per_device:grad_accum:log_steps; 2 ranks x 2 rows = 1 process x 4 rows (or 2 x 2 accumulated)
SPECS = ["2/resume-plain:2:1:0", "3/resume-plain:2:1:0", "3/balance:2:1:0"]
Run = dict[str, Any]  # as in test_distributed, and "trainer-save": the directory `trainer.save_model` wrote


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, Run] | Run]:
    """'zero2-plain', 'zero3-plain', 'zero3-balance' -> rank -> Run; 'single-plain' / 'single-balance'."""
    out = tmp_path_factory.mktemp("deepspeed")
    torchrun(["--deepspeed", str(out / "ds"), *SPECS], env={"DS_ACCELERATOR": "cpu"})
    ddp_worker.main([str(out / "single"), "plain:4:1:0", "balance:2:2:0"])
    found: dict[str, dict[int, Run] | Run] = {
        "single-plain": load_run(out / "single" / "plain-b4-ga1-log0" / "rank0"),
        "single-balance": load_run(out / "single" / "balance-b2-ga2-log0" / "rank0"),
    }
    for name, run_dir in [
        ("zero2-plain", "zero2-resume-plain-b2-ga1-log0"),
        ("zero3-plain", "zero3-resume-plain-b2-ga1-log0"),
        ("zero3-balance", "zero3-balance-b2-ga1-log0"),
    ]:
        ranks = {rank: load_run(out / "ds" / run_dir / f"rank{rank}") for rank in (0, 1)}
        ranks[0]["trainer-save"] = out / "ds" / run_dir / "trainer-save"
        found[name] = ranks
    return found


@pytest.mark.parametrize("name", ["zero2-plain", "zero3-plain"])
def test_zero_two_processes_equal_one_process(runs, name: str) -> None:
    r0, r1 = runs[name][0], runs[name][1]
    assert r0["run"]["world_size"] == 2 and r0["run"]["steps"] == 5
    for key, value in r0["adapter"].items():
        assert torch.equal(value, r1["adapter"][key]), key
    diff = max_diff(r0["adapter"], runs["single-plain"]["adapter"])
    assert diff <= ATOL, diff
    assert max_diff(r0["adapter"], r0["init"]) > 1e-2  # training moved the adapter (routers included)
    routers = [k for k in r0["adapter"] if ".router.weight_blocks." in k]
    assert routers and all(not torch.equal(r0["adapter"][k], r0["init"][k]) for k in routers)
    # all-reduced statistics: every real token of the run (the resumed run: of steps 4 and 5, rows 12..19)
    first_row = 12 if "resumed_steps" in r0["run"] else 0
    real_tokens = sum(sum(row) for row in ddp_worker.dataset()["attention_mask"][first_row:])
    assert all(stats["tokens"] == real_tokens for stats in r0["run"]["routing"].values())


def test_zero3_partitions_the_adapter(runs) -> None:
    """Each rank holds half of every trained tensor (ZeRO-3), ZeRO-2 all of them (it shards optimizer
    states and gradients only)."""
    fractions = [runs["zero3-plain"][rank]["run"]["local_fraction"] for rank in (0, 1)]
    assert all(0 < f < 1 for f in fractions) and sum(fractions) == pytest.approx(1.0, abs=0.01)
    assert runs["zero2-plain"][0]["run"]["local_fraction"] == 1.0


@pytest.mark.parametrize("name", ["zero2-plain", "zero3-plain"])
def test_zero_resumes_from_its_checkpoint(runs, name: str) -> None:
    """The run trained 5 steps with checkpoints at 3 and 5; checkpoint-5 was removed and a new model
    resumed from checkpoint-3 (DeepSpeed's engine state): 2 more steps, ending where one uninterrupted
    process ends (the adapter compared above is the resumed one; `trainer-save` the uninterrupted)."""
    run = runs[name][0]["run"]
    assert run["resumed_steps"] == 2 and run["steps"] == 5


def test_zero3_balance_losses_per_rank(runs) -> None:
    """With balance losses, 2 ranks x 2 rows equal 1 process x 2 micro-batches of 2 rows (as under DDP)."""
    ds = runs["zero3-balance"][0]
    diff = max_diff(ds["adapter"], runs["single-balance"]["adapter"])
    assert diff <= ATOL, diff


@pytest.mark.parametrize("name", ["zero2-plain", "zero3-plain"])
def test_zero_trainer_save_model_is_the_adapter(runs, name: str) -> None:
    """`trainer.save_model` under DeepSpeed writes the gathered adapter (not DeepSpeed's empty ZeRO-3
    shards or a whole-model state dict); it loads onto the unsharded base with `strict=True` (the
    fingerprint recorded from the partitioned base equals the whole base's)."""
    r0 = runs[name][0]
    saved_dir: Path = r0["trainer-save"]
    assert sorted(p.name for p in saved_dir.iterdir()) == [
        "moetune_config.json",
        WEIGHTS_NAME,
        "training_args.bin",
    ]
    saved = load_file(str(saved_dir / WEIGHTS_NAME))
    assert saved.keys() == r0["adapter"].keys()
    assert all(torch.equal(saved[k], r0["adapter"][k]) for k in saved)
    loaded = moetune.MoEModel.from_pretrained(tiny_model("llama"), saved_dir, strict=True)
    state = adapter_state_dict(loaded)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
