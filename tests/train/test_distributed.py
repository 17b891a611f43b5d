"""2-process CPU data parallelism (torchrun, gloo) against 1 process on the same global batch.

The 2-process runs happen once, in a `torchrun --nproc_per_node 2` subprocess of tests/helpers/ddp_worker.py;
the 1-process runs in this process with the same worker code (see its docstring for what is fixed).
Global batch: 4 rows per optimizer step, 5 steps, plain SGD (lr 0.1, no clipping).

Tolerance: ATOL = 1e-6 on every adapter tensor. Two processes sum the loss over their own rows and
gloo adds the two gradients; one process sums over all rows in one pass: the same numbers added in
another order, float32 (~6e-8 relative each). Measured differences after 5 steps are 1e-8..1e-7 with
parameters that moved by 0.06, so 1e-6 leaves a 10x margin and is still 6e4 times smaller than the
training's own change; a world-size or token-count scaling error changes the result by ~1e-2.

FSDP2 (`fully_shard`) is tested in a plain loop of the worker (`--fsdp`, plain case): the Trainer's
`fsdp` option does not shard on CPU (accelerate keeps its FSDP plugin only for accelerator devices and
runs DDP instead). Measured difference to one process: 2.5e-8, under the same ATOL.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import moetune
from moetune.core.stats import PER_RANK_BUFFERS
from moetune.io.adapter import adapter_state_dict
from tests.helpers import ddp_worker
from tests.helpers.distributed import ATOL, Run, load_run, max_diff, run_dir, torchrun
from tests.helpers.tiny_models import tiny_model

# case:per_device_batch:grad_accum:log_steps (see ddp_worker). 2 ranks x 2 rows = 1 process x 4 rows.
TWO_PROCESS = ["plain:2:1:0", "bias:2:1:0", "balance:2:1:0", "balance:1:2:3"]
ONE_PROCESS = ["plain:4:1:0", "bias:4:1:0", "balance:4:1:0", "balance:2:2:0", "balance:1:4:3"]

# (FSDP runs also "dir": the rank's directory)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo needed"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, int], Run]:
    """(world, spec, rank) -> Run, with world "ddp" (2 processes) or "single" (this process)."""
    out = tmp_path_factory.mktemp("ddp")
    torchrun([str(out / "ddp"), *TWO_PROCESS])
    ddp_worker.main([str(out / "single"), *ONE_PROCESS])
    found: dict[tuple[str, str, int], Run] = {}
    for spec in TWO_PROCESS:
        for rank in (0, 1):
            found["ddp", spec, rank] = load_run(out / "ddp" / run_dir(spec) / f"rank{rank}")
    for spec in ONE_PROCESS:
        found["single", spec, 0] = load_run(out / "single" / run_dir(spec) / "rank0")
    return found


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Run]:
    """rank -> Run of `ddp_worker.py --fsdp plain:2:1:0` under torchrun (2 processes, FSDP2)."""
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(["--fsdp", str(out), "plain:2:1:0"])
    rank_dirs = {rank: out / run_dir("plain:2:1:0") / f"rank{rank}" for rank in (0, 1)}
    return {rank: load_run(rank_dir) | {"dir": rank_dir} for rank, rank_dir in rank_dirs.items()}


def test_ranks_end_with_identical_adapters(runs) -> None:
    for spec in TWO_PROCESS:
        r0, r1 = runs["ddp", spec, 0], runs["ddp", spec, 1]
        assert r0["run"]["world_size"] == 2 and r0["run"]["steps"] == 5
        for key, value in r0["adapter"].items():
            assert torch.equal(value, r1["adapter"][key]), (spec, key)
        assert r0["run"] == r1["run"], spec  # all-reduced statistics and logs agree


@pytest.mark.parametrize("case", ["plain", "bias"])
def test_two_processes_equal_one_process_without_balance_losses(runs, case: str) -> None:
    ddp, single = runs["ddp", f"{case}:2:1:0", 0], runs["single", f"{case}:4:1:0", 0]
    assert single["run"]["world_size"] == 1 and single["run"]["steps"] == 5
    diff = max_diff(ddp["adapter"], single["adapter"])
    assert diff <= ATOL, diff
    assert max_diff(single["adapter"], single["init"]) > 1e-2  # training moved the adapter


def test_bias_and_statistics_are_all_reduced(runs) -> None:
    """Integer counts: the expert bias and the token statistics match one process exactly."""
    ddp, single = runs["ddp", "bias:2:1:0", 0], runs["single", "bias:4:1:0", 0]
    biases = [k for k in single["adapter"] if k.endswith("expert_bias")]
    assert len(biases) == 2 and any(single["adapter"][k].abs().sum() > 0 for k in biases)  # it moved
    for key in biases:
        assert torch.equal(ddp["adapter"][key], single["adapter"][key]), key
    real_tokens = sum(sum(row) for row in ddp_worker.dataset()["attention_mask"])  # 170, padding excluded
    routing, expected = ddp["run"]["routing"], single["run"]["routing"]
    assert routing.keys() == expected.keys() and len(routing) == 2
    for layer, got in routing.items():
        assert got["tokens"] == real_tokens == expected[layer]["tokens"]
        assert got["tokens_per_expert"] == expected[layer]["tokens_per_expert"]
        assert got["entropy"] == pytest.approx(expected[layer]["entropy"], abs=1e-6)


def test_balance_losses_are_per_rank_micro_batch_means(runs) -> None:
    """With balance losses on, 2 ranks x 2 rows = 1 process x 2 micro-batches of 2 rows (accumulated).

    Each rank's balance loss is computed on its own micro-batch and DDP averages the gradients: the mean
    of the per-rank losses, which is what gradient accumulation does for micro-batches in one process
    (the mixin divides the balance losses by the accumulation steps). It is not the loss of the global
    batch of 4 rows: the Switch loss sum_i f_i P_i is not linear in the tokens.
    """
    ddp = runs["ddp", "balance:2:1:0", 0]
    assert max_diff(ddp["adapter"], runs["single", "balance:2:2:0", 0]["adapter"]) <= ATOL
    global_batch = runs["single", "balance:4:1:0", 0]["adapter"]
    assert max_diff(ddp["adapter"], global_batch, skip="expert_bias") > 1e-3


def test_accumulation_under_ddp_and_logs(runs) -> None:
    """2 ranks x 1 row x 2 accumulated = 1 process x 1 row x 4 accumulated (rows 4s..4s+3 per step).

    A step log at step 3 (the Trainer logs on every rank): the loss, the balance losses and the load CV
    of the logged steps are means over all ranks, as in one process; it resets the statistics.
    """
    ddp, single = runs["ddp", "balance:1:2:3", 0], runs["single", "balance:1:4:3", 0]
    assert max_diff(ddp["adapter"], single["adapter"]) <= ATOL
    (got,), (expected,) = ddp["run"]["logs"], single["run"]["logs"]
    assert got["step"] == expected["step"] == 3
    for key in ("loss", "moe/aux_loss", "moe/z_loss", "moe/load_cv"):
        assert got[key] == pytest.approx(expected[key], abs=2e-6), key  # logged values are rounded to 1e-6
    # the statistics since that log: the last 2 steps, 4 rows each
    last_tokens = sum(sum(row) for row in ddp_worker.dataset()["attention_mask"][12:])
    for layer, stats in ddp["run"]["routing"].items():
        assert stats["tokens"] == last_tokens
        assert stats["tokens_per_expert"] == single["run"]["routing"][layer]["tokens_per_expert"]


def test_ddp_leaves_the_per_rank_counts_alone() -> None:
    """DDP reads `_ddp_params_and_buffers_to_ignore`: exactly the routers' running counts, never saved."""
    model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(num_experts=4))
    ignored = model._ddp_params_and_buffers_to_ignore
    buffers = dict(model.named_buffers())
    expected = {n for n in buffers if n.rsplit(".", 1)[-1] in PER_RANK_BUFFERS}
    assert set(ignored) == expected and len(expected) == 2 * len(PER_RANK_BUFFERS)  # 2 MoE layers
    saved = adapter_state_dict(model)
    assert not any(n.rsplit(".", 1)[-1] in PER_RANK_BUFFERS for n in saved)
    assert any(n.endswith("expert_bias") for n in saved)  # the bias is saved (and stays broadcast)


def test_fsdp_two_processes_equal_one_process(fsdp_runs, runs) -> None:
    """FSDP2 shards the adapter (each rank holds part of it); the gathered save equals one process."""
    r0, r1 = fsdp_runs[0], fsdp_runs[1]
    for run in (r0["run"], r1["run"]):
        assert run["world_size"] == 2 and run["steps"] == 5 and run["class"] == "FSDPMoEModel"
        assert 0 < run["local_fraction"] < 1  # sharded, not replicated
    assert r0["run"]["local_fraction"] + r1["run"]["local_fraction"] == pytest.approx(1.0)
    assert r0["adapter"].keys() == r1["adapter"].keys()
    for key, value in r0["adapter"].items():
        assert torch.equal(value, r1["adapter"][key]), key
    assert r0["run"]["routing"] == r1["run"]["routing"]  # all-reduced
    real_tokens = sum(sum(row) for row in ddp_worker.dataset()["attention_mask"])
    assert all(stats["tokens"] == real_tokens for stats in r0["run"]["routing"].values())
    single = runs["single", "plain:4:1:0", 0]
    diff = max_diff(r0["adapter"], single["adapter"])
    assert diff <= ATOL, diff
    assert max_diff(r0["adapter"], r0["init"]) > 1e-2  # training moved the adapter
    assert r0["run"]["reload_equals_init"] and r1["run"]["reload_equals_init"]  # loading into the shards


def test_fsdp_saved_adapter_loads(fsdp_runs) -> None:
    """The adapter saved under FSDP loads onto the unsharded base unchanged; `strict=True`: the base
    fingerprint recorded from the sharded model (gathered) equals the unsharded base's."""
    loaded = moetune.MoEModel.from_pretrained(tiny_model("llama"), fsdp_runs[0]["dir"], strict=True)
    state, saved = adapter_state_dict(loaded), fsdp_runs[0]["adapter"]
    assert state.keys() == saved.keys()
    for key, value in state.items():
        assert torch.equal(value, saved[key]), key
