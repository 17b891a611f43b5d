"""Routing statistics (router imbalance measured and shown). Padding never counts.

Each router accumulates, between resets, the slots each expert received and the entropy of its
probabilities; `summarize` turns them into the numbers users read: tokens per expert, load CV
(std / mean of the counts, 0 = perfectly even), mean router entropy in nats (log E = uniform), dead
experts (no token at all), and two effective numbers of experts, exp(entropy) (Hill's diversity of
order 1; E = every expert used evenly, 1 = collapse onto one):
  effective_experts  mean over real tokens of exp(H(w_t)), w_t the token's combine weights normalised
                     to sum 1 (a token that no expert takes counts 0): how many experts a token mixes
  effective_load     exp(H(c / sum c)), c the slots per expert: how many experts share the work
A router collapsed onto one expert, as ReMix (ICLR 2026) reports of MixLoRA, has both near 1.
Under data parallelism the sums are taken across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moetune.core.routing import Router, Routing

# The router buffers that hold this rank's running sums: all-reduced when read, never copied between
# ranks (DDP's per-forward buffer broadcast would replace them with rank 0's, see MoEModel).
PER_RANK_BUFFERS = (
    "step_counts",
    "load_counts",
    "entropy_sum",
    "token_count",
    "effective_sum",
    "task_counts",
)


@torch.no_grad()
def accumulate_stats(
    router: Router,
    routing: Routing,
    mask_T: Tensor,
    count_step: bool,
    blocks: tuple[int, ...] | None = None,
    task: int | None = None,
) -> None:
    """Add one routing's counts; `blocks`: the task blocks it was restricted to (None: all experts).
    Tokens routed for one task (`task`, its index) also count in that task's row of `task_counts`."""
    counts_E = (routing.assignment() & mask_T[:, None]).sum(0).to(torch.float64)
    if counts_E.numel() != router.num_experts:  # restricted: scatter to the experts' global indices
        full_E = torch.zeros_like(router.load_counts)
        for (start, n), local in zip(router.block_ranges(blocks), _starts(router, blocks), strict=True):
            full_E[start : start + n] = counts_E[local : local + n]
        counts_E = full_E
    router.load_counts += counts_E
    if count_step:
        router.step_counts += counts_E
    if task is not None:
        router.task_counts[task] += counts_E
    entropy_T = torch.special.entr(routing.probs.to(torch.float64)).sum(-1)  # -sum p log p, 0 log 0 = 0
    router.entropy_sum += torch.where(mask_T, entropy_T, 0.0).sum()  # a where, not a gather: no host sync
    router.effective_sum += torch.where(mask_T, effective_experts(routing.dense_weights()), 0.0).sum()
    router.token_count += mask_T.sum()


def effective_experts(w_TE: Tensor) -> Tensor:
    """Per token, exp of the entropy of its combine weights normalised to sum 1; 0 for a token with
    none  -> (T,) float64."""
    w_TE = w_TE.to(torch.float64)
    total_T1 = w_TE.sum(-1, keepdim=True)
    shares_TE = w_TE / torch.where(total_T1 > 0, total_T1, torch.ones_like(total_T1))
    entropy_T = torch.special.entr(shares_TE).sum(-1)
    return torch.where(total_T1[:, 0] > 0, entropy_T.exp(), torch.zeros_like(entropy_T))


def effective_load(counts_E: Tensor) -> float:
    """exp of the entropy of the expert loads' shares (E when even, 1 when one expert takes all);
    0 when nothing was routed."""
    total = counts_E.double().sum()
    if total == 0:
        return 0.0
    return float(torch.special.entr(counts_E.double() / total).sum().exp())


def _starts(router: Router, blocks: tuple[int, ...] | None) -> list[int]:
    sizes = [n for _, n in router.block_ranges(blocks)]
    return [sum(sizes[:i]) for i in range(len(sizes))]


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over data-parallel ranks (no-op in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def load_cv(counts_E: Tensor) -> float:
    """Coefficient of variation of expert loads (population std / mean); 0 when no token was routed."""
    mean = counts_E.double().mean()
    return 0.0 if mean == 0 else float(counts_E.double().std(unbiased=False) / mean)


def summarize(router: Router) -> dict[str, Any]:
    counts_E = all_reduce_sum(router.load_counts)
    totals = all_reduce_sum(torch.stack([router.entropy_sum, router.token_count, router.effective_sum]))
    tokens = float(totals[1])
    return {
        "tokens": int(tokens),
        "tokens_per_expert": [int(c) for c in counts_E.tolist()],
        "load_cv": load_cv(counts_E),
        "entropy": float(totals[0]) / tokens if tokens else float("nan"),
        "max_entropy": float(torch.log(torch.tensor(float(counts_E.numel())))),
        "dead_experts": [i for i, c in enumerate(counts_E.tolist()) if c == 0] if tokens else [],
        "effective_experts": float(totals[2]) / tokens if tokens else float("nan"),
        "effective_load": effective_load(counts_E),
    }


def by_task(router: Router, tasks: list[str]) -> dict[str, list[int]]:
    """Task name -> tokens per expert of the tokens routed for that task alone (tasks with none omitted)."""
    counts = all_reduce_sum(router.task_counts)
    return {
        task: [int(c) for c in row.tolist()] for task, row in zip(tasks, counts, strict=True) if row.any()
    }


def reset(router: Router) -> None:
    for buf in (router.load_counts, router.entropy_sum, router.token_count, router.effective_sum):
        buf.zero_()
    router.task_counts.zero_()


def merge(groups: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per-layer statistics of several token sets (e.g. tasks) pooled: counts summed, the rest recomputed."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in groups[0]:
        parts = [g[layer] for g in groups]
        counts = torch.tensor([p["tokens_per_expert"] for p in parts], dtype=torch.float64).sum(0)
        tokens = sum(p["tokens"] for p in parts)
        entropy, effective = (
            sum(p[key] * p["tokens"] for p in parts if p["tokens"]) / tokens if tokens else float("nan")
            for key in ("entropy", "effective_experts")
        )
        merged[layer] = {
            "tokens": tokens,
            "tokens_per_expert": [int(c) for c in counts.tolist()],
            "load_cv": load_cv(counts),
            "entropy": entropy,
            "max_entropy": parts[0]["max_entropy"],
            "dead_experts": [i for i, c in enumerate(counts.tolist()) if c == 0] if tokens else [],
            "effective_experts": effective,
            "effective_load": effective_load(counts),
        }
    return merged


def task_information(groups: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """Per layer, the mutual information in bits between a routed slot's task and its expert,
    I(T; E) = sum_te p(t, e) log2 p(t, e) / (p(t) p(e)), from each task's statistics (task name ->
    `MoEModel.routing_stats()` over that task's tokens alone). 0: every task spreads over the experts
    alike; log2(tasks) or log2(E), whichever is smaller: each task has experts of its own."""
    tasks = list(groups)
    out = {}
    for layer in groups[tasks[0]]:
        counts_TE = torch.tensor([groups[t][layer]["tokens_per_expert"] for t in tasks], dtype=torch.float64)
        total = counts_TE.sum()
        if total == 0:
            out[layer] = float("nan")
            continue
        p_TE = counts_TE / total
        independent_TE = p_TE.sum(1, keepdim=True) * p_TE.sum(0, keepdim=True)
        seen = p_TE > 0
        out[layer] = float((p_TE[seen] * torch.log2(p_TE[seen] / independent_TE[seen])).sum())
    return out


def min_share_times_experts(layers: dict[str, dict[str, Any]]) -> float:
    """The smallest share of routed slots any expert of any layer gets, times E (1.0 = perfectly even)."""
    worst = float("inf")
    for s in layers.values():
        counts = s["tokens_per_expert"]
        total = sum(counts)
        if total:
            worst = min(worst, min(counts) / total * len(counts))
    return worst
