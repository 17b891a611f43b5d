"""Routers: score E experts per token and choose which ones combine, and with what weights.

A router is a linear map to E logits computed in `router_dtype` (fp32 by default, as in the Switch
Transformer: bf16 router logits make the softmax unstable), a softmax, and one small *routing function* that
turns probabilities into slots. The result keeps the raw logits, the probabilities and the chosen slots
apart (`Routing`), so that losses and statistics read exactly what the layer used.

Routing functions (pluggable through `ROUTING_FUNCTIONS`; called with probs, scores (= probs + bias)
and keywords logits, mask and the router's options; each returns indices, weights and an "active"
flag per slot, shape (T, K)):
  topk       keep the k best experts, renormalise their probabilities (Shazeer et al. 2017; MixLoRA).
  topp       smallest set with probability mass >= top_p, renormalised (dynamic routing, Huang et al. 2024).
  soft       every expert with its probability (dense mixture).
  switch     top-1 with weight p (Fedus et al. 2021); each expert takes at most
             ceil(capacity_factor * T / E) real tokens, in token order; the rest keep the base output.
  threshold  AdaMoLE (Liu & Luo 2024): tau = tau_max * sigmoid(w_t . x + b_t) per token; experts with
             p >= tau are active with weights (p - tau) / sum(p - tau).
With aux-loss-free balancing (DeepSeek-V3, Wang et al. 2024) selection uses p + b and weights use p.

Task routing (`task_routing`): every task has a learned embedding e_task (d_in,) per router.
  task        the router sees e_task alone (MOELoRA, Liu et al. 2023): a fixed mixture per task,
              whatever the token. Embeddings start N(0, 1), so tasks start from different mixtures.
  token+task  the router sees x + e_task. Embeddings start at 0: routing starts as by token alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetune.core.sharding import full_shape


@dataclass
class Routing:
    """What a router decided for T tokens; K slots per token (K = k, 1 or E by router)."""

    logits: Tensor  # (T, E) raw router logits, router dtype
    probs: Tensor  # (T, E) softmax(logits), unbiased
    indices: Tensor  # (T, K) expert of each slot
    weights: Tensor  # (T, K) combine weight of each slot; 0 where the slot is unused
    active: Tensor  # (T, K) bool: the slot is really assigned (counts for losses and statistics)

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    def dense_weights(self) -> Tensor:
        """Combine weights scattered to experts: (T, E), 0 for experts not chosen."""
        w_TK = torch.where(self.active, self.weights, torch.zeros_like(self.weights))
        return torch.zeros_like(self.probs).scatter_add(-1, self.indices, w_TK.to(self.probs.dtype))

    def assignment(self) -> Tensor:
        """(T, E) bool: expert e holds a slot of token t."""
        hits = torch.zeros(self.probs.shape, dtype=torch.int32, device=self.probs.device)
        return hits.scatter_add(-1, self.indices, self.active.int()) > 0


def _renormalise(w_TK: Tensor) -> Tensor:
    return w_TK / w_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(w_TK.dtype).tiny)


def route_topk(
    probs: Tensor, scores: Tensor, *, top_k: int, logits: Tensor | None = None, **_: object
) -> tuple[Tensor, Tensor, Tensor]:
    idx_TK = scores.topk(top_k, dim=-1).indices
    p_TK = probs.gather(-1, idx_TK)
    if logits is not None:
        # an expert bias can select experts whose p all underflowed to 0: their renormalised
        # probabilities are then the softmax of their logits (weights must still sum to 1)
        p_TK = torch.where(p_TK.sum(-1, keepdim=True) > 0, p_TK, logits.gather(-1, idx_TK).softmax(-1))
    return idx_TK, _renormalise(p_TK), torch.ones_like(idx_TK, dtype=torch.bool)


def route_topp(probs: Tensor, scores: Tensor, *, top_p: float, **_: object) -> tuple[Tensor, Tensor, Tensor]:
    idx_TE = scores.argsort(dim=-1, descending=True, stable=True)
    p_TE = probs.gather(-1, idx_TE)
    mass_before_TE = p_TE.cumsum(-1) - p_TE
    active_TE = mass_before_TE < top_p  # the best expert is always in
    active_TE[:, 0] = True
    w_TE = _renormalise(torch.where(active_TE, p_TE, torch.zeros_like(p_TE)))
    return idx_TE, w_TE, active_TE


def route_soft(probs: Tensor, scores: Tensor, **_: object) -> tuple[Tensor, Tensor, Tensor]:
    T, E = probs.shape
    idx_TE = torch.arange(E, device=probs.device).expand(T, E)
    return idx_TE, probs, torch.ones_like(idx_TE, dtype=torch.bool)


def route_switch(
    probs: Tensor, scores: Tensor, *, mask: Tensor, capacity_factor: float, **_: object
) -> tuple[Tensor, Tensor, Tensor]:
    E = probs.shape[-1]
    idx_T1 = scores.argmax(-1, keepdim=True)
    onehot_TE = F.one_hot(idx_T1[:, 0], E) * mask[:, None].long()  # padding takes no capacity
    position_TE = onehot_TE.cumsum(0)  # 1-based arrival order of each token at its expert
    capacity = torch.ceil(capacity_factor * mask.sum() / E)
    fits_T1 = (position_TE.gather(-1, idx_T1) <= capacity) & mask[:, None]
    w_T1 = torch.where(fits_T1, probs.gather(-1, idx_T1), torch.zeros((), dtype=probs.dtype))
    return idx_T1, w_T1, fits_T1


def route_threshold(
    probs: Tensor, scores: Tensor, *, tau: Tensor, **_: object
) -> tuple[Tensor, Tensor, Tensor]:
    T, E = probs.shape
    idx_TE = torch.arange(E, device=probs.device).expand(T, E)
    active_TE = scores >= tau  # tau: (T, 1)
    excess_TE = torch.where(active_TE, (probs - tau).clamp_min(0), torch.zeros_like(probs))
    total_T1 = excess_TE.sum(-1, keepdim=True)
    w_TE = excess_TE / torch.where(total_T1 > 0, total_T1, torch.ones_like(total_T1))
    return idx_TE, w_TE, active_TE


RoutingFunction = Callable[..., tuple[Tensor, Tensor, Tensor]]
ROUTING_FUNCTIONS: dict[str, RoutingFunction] = {
    "topk": route_topk,
    "topp": route_topp,
    "soft": route_soft,
    "switch": route_switch,
    "threshold": route_threshold,
}

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@contextmanager
def no_autocast(device: torch.device) -> Iterator[None]:
    """torch.autocast off on `device` for the block: under autocast F.linear, matmul and einsum run in
    bf16/fp16 whatever their inputs' dtype, which would undo an fp32 router or loss."""
    if not torch.amp.is_autocast_available(device.type):  # e.g. "meta": no autocast to turn off
        yield
        return
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class Router(nn.Module):
    """Linear router over E experts held as one weight block per task (so old rows can be frozen).

    Buffers: `expert_bias` (E,) for aux-loss-free balancing (saved with the adapter); running counts
    for the bias update and the routing statistics (not saved), also per task (`task_counts`).
    `forward(..., blocks=(0, 2))` routes among the experts of those task blocks alone: the logits of
    the others are never computed (the same as masking them to -inf before the softmax), so the chosen
    experts are numbered 0..E'-1 in block order, and k shrinks to E' when a task owns fewer experts.
    """

    # routers whose weights sum to 1 on every token, padding included (renormalised or dense softmax)
    WEIGHTS_SUM_TO_ONE = ("topk", "topp", "soft")

    @property
    def weights_sum_to_one(self) -> bool:
        return self.kind in self.WEIGHTS_SUM_TO_ONE

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        *,
        kind: str = "topk",
        top_k: int = 2,
        top_p: float = 0.8,
        capacity_factor: float = 1.25,
        threshold_max: float | None = None,
        router_dtype: str = "float32",
        jitter: float = 0.0,
        task_routing: str = "none",
        num_tasks: int = 1,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.task_routing = task_routing
        self.kind, self.top_k, self.top_p = kind, top_k, top_p
        self.capacity_factor, self.jitter = capacity_factor, jitter
        self.threshold_max = threshold_max
        self.dtype = DTYPES[router_dtype]
        param_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.weight_blocks = nn.ParameterList([self._new_rows(num_experts, d_in, param_dtype, device)])
        # task embeddings, one tensor per group of tasks created together (so old ones can be frozen)
        self.task_embedding_blocks = nn.ParameterList()
        if task_routing != "none":
            self.task_embedding_blocks.append(self._new_task_rows(num_tasks, d_in, param_dtype, device))
        # AdaMoLE's threshold network (only for the threshold router)
        threshold = nn.Linear(d_in, 1, dtype=param_dtype) if kind == "threshold" else None
        self.threshold = None if threshold is None else threshold.to(device)  # initialised on the CPU
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=param_dtype, device=device))
        # running statistics (moetune.core.stats), not saved
        counts = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.register_buffer("step_counts", counts.clone(), persistent=False)  # since the optimizer step
        self.register_buffer("load_counts", counts.clone(), persistent=False)  # since the last stats reset
        self.register_buffer(
            "entropy_sum", torch.zeros((), dtype=torch.float64, device=device), persistent=False
        )
        self.register_buffer(
            "token_count", torch.zeros((), dtype=torch.float64, device=device), persistent=False
        )
        self.register_buffer(  # sum over tokens of exp(entropy of the combine weights)
            "effective_sum", torch.zeros((), dtype=torch.float64, device=device), persistent=False
        )
        # tokens per expert of the tokens routed for one task (tasks x E), since the last reset
        self.register_buffer("task_counts", counts.clone()[None].repeat(num_tasks, 1), persistent=False)

    def add_block(self, n: int) -> None:
        """Append n experts for a new task: new router rows (N(0, 0.02^2)), zero bias, zero counts, and
        the task's embedding under task routing."""
        old = self.weight_blocks[0]
        self.weight_blocks.append(self._new_rows(n, old.shape[1], old.dtype, old.device))
        if self.task_routing != "none":
            self.task_embedding_blocks.append(self._new_task_rows(1, old.shape[1], old.dtype, old.device))
        for name in ("expert_bias", "step_counts", "load_counts"):
            buf = getattr(self, name)
            setattr(self, name, torch.cat([buf, buf.new_zeros(n)]))
        grown = self.task_counts.new_zeros(self.task_counts.shape[0] + 1, self.num_experts)
        grown[:-1, : self.task_counts.shape[1]] = self.task_counts
        self.task_counts = grown

    def block_ranges(self, blocks: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
        """(first expert, count) of each task block in `blocks` (None: all), in block order."""
        starts = [0]
        for w in self.weight_blocks:
            starts.append(starts[-1] + full_shape(w)[0])
        chosen = range(len(self.weight_blocks)) if blocks is None else blocks
        return [(starts[b], starts[b + 1] - starts[b]) for b in chosen]

    def trainable_experts(self) -> Tensor:
        """(E,) bool: the expert's router rows train (its bias may move at the optimizer step)."""
        flags = [torch.full((full_shape(w)[0],), w.requires_grad) for w in self.weight_blocks]
        return torch.cat(flags).to(self.expert_bias.device)

    @staticmethod
    def _new_rows(n: int, d_in: int, dtype: torch.dtype, device: torch.device | None) -> nn.Parameter:
        # random weights are drawn on the CPU (as peft's): one seed gives one router on every device
        return nn.Parameter((torch.randn(n, d_in, dtype=dtype) * 0.02).to(device=device))

    def _new_task_rows(
        self, n: int, d_in: int, dtype: torch.dtype, device: torch.device | None
    ) -> nn.Parameter:
        rows = torch.zeros(n, d_in, dtype=dtype)
        if self.task_routing == "task":
            rows.normal_()
        return nn.Parameter(rows.to(device=device))

    def task_embedding(self, task: int) -> Tensor:
        """(d_in,) the learned embedding of task `task` (index in the model's task list)."""
        for rows in self.task_embedding_blocks:
            if task < rows.shape[0]:
                return rows[task]
            task -= rows.shape[0]
        raise IndexError(f"no task embedding for task index {task}")

    @property
    def num_experts(self) -> int:
        return sum(full_shape(w)[0] for w in self.weight_blocks)  # also partitioned by ZeRO-3

    @property
    def weight(self) -> Tensor:
        """(E, d_in) all rows, task blocks in order."""
        blocks = list(self.weight_blocks)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 0)

    def extra_repr(self) -> str:
        routing = "" if self.task_routing == "none" else f", task_routing={self.task_routing}"
        return f"kind={self.kind}, num_experts={self.num_experts}, dtype={self.dtype}{routing}"

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Router:
        """Device moves apply; dtype casts of an enclosing model (`model.to(torch.bfloat16)`, `.half()`,
        transformers' `bf16_full_eval`) do not: the router's weights keep their dtype (fp32, or fp64 with
        router_dtype="float64") and its running counts stay float64 (bf16 counts are inexact past 256)."""
        before = {name: t.dtype for name, t in [*self.named_parameters(), *self.named_buffers()]}
        super()._apply(fn, recurse)
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            dtype = before.get(name, t.dtype)
            if t.dtype == dtype:
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = self.get_submodule(owner_name)
            if leaf in owner._parameters:
                t.data = t.data.to(dtype)  # the same Parameter object: optimizers keep referring to it
                if t.grad is not None:
                    t.grad = t.grad.to(dtype)
            else:
                owner._buffers[leaf] = t.to(dtype)
        return self

    def forward(
        self,
        x_TD: Tensor,
        mask_T: Tensor,
        use_bias: bool = False,
        blocks: tuple[int, ...] | None = None,
        task: int | None = None,
    ) -> Routing:
        """Route T tokens among the experts of the task `blocks` (None: every expert); `task`: the tokens'
        task index, which task routing needs. Computed in `router_dtype`, also under torch.autocast."""
        with no_autocast(x_TD.device):
            return self._route(x_TD, mask_T, use_bias, blocks, task)

    def _route(
        self, x_TD: Tensor, mask_T: Tensor, use_bias: bool, blocks: tuple[int, ...] | None, task: int | None
    ) -> Routing:
        x_TD = x_TD.to(self.dtype)
        if self.task_routing != "none":
            if task is None:
                raise ValueError(
                    f"task_routing={self.task_routing!r} routes by task, but no task was given: pass "
                    "task_ids=... to the forward (or generate), or run under use_tasks([...]) with one task"
                )
            e_D = self.task_embedding(task).to(self.dtype)
            # "task": the router sees the task alone (a fixed mixture per task, MOELoRA)
            x_TD = e_D.expand_as(x_TD) if self.task_routing == "task" else x_TD + e_D
        if self.training and self.jitter > 0 and self.task_routing != "task":
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise  # a new tensor: the caller's input is left untouched
        weight_ED, bias_E = self.weight, self.expert_bias
        if blocks is not None and len(blocks) < len(self.weight_blocks):
            rows = [self.weight_blocks[b] for b in blocks]
            weight_ED = rows[0] if len(rows) == 1 else torch.cat(rows)
            bias_E = torch.cat([self.expert_bias[s : s + n] for s, n in self.block_ranges(blocks)])
        E = weight_ED.shape[0]
        logits_TE = F.linear(x_TD, weight_ED.to(self.dtype))
        probs_TE = logits_TE.softmax(-1)
        scores_TE = probs_TE + bias_E.to(self.dtype) if use_bias else probs_TE
        tau_T1 = None
        if self.threshold is not None:
            tau_max = self.threshold_max if self.threshold_max is not None else 1.0 / E
            weight, bias = self.threshold.weight.to(self.dtype), self.threshold.bias.to(self.dtype)
            tau_T1 = tau_max * torch.sigmoid(F.linear(x_TD, weight, bias))
        idx, w, active = ROUTING_FUNCTIONS[self.kind](
            probs_TE,
            scores_TE,
            logits=logits_TE,
            mask=mask_T,
            top_k=min(self.top_k, E),  # a task that owns fewer than k experts uses them all
            top_p=self.top_p,
            capacity_factor=self.capacity_factor,
            tau=tau_T1,
        )
        return Routing(logits_TE, probs_TE, idx, w, active)


def max_slots(kind: str, top_k: int, num_experts: int) -> int:
    """K, the slots per token a routing function returns."""
    return {"topk": top_k, "switch": 1}.get(kind, num_experts)
