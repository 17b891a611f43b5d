"""What the model wrapper tells its layers during a forward, which transformers gives no way to pass.

transformers never hands an MLP the attention mask, the task of each sample, or the wrapper's
switches; every moetune layer holds the model's one `RoutingContext` instead, which keeps apart:

  ComputeOptions  how the layers compute (the reference loop, the slot path, piece sizes); the
                  results are the same whatever they say (tests and benchmarks set them)
  ForwardState    what one forward routes with: its padding mask and task groups (set per forward),
                  and the user's switches (adapter on/off, the tasks to route among)
  records         what the forward's routers leave behind: one `RouterRecord` each, for the losses
  replay          the last forward's state, kept for activation checkpointing, which re-runs parts of
                  that forward inside backward (`RoutingContext.now()` is the state to route with)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moetune.core.checkpointing import AuxTap
from moetune.core.routing import Routing
from moetune.core.tasks import Blocks, SampleGroup


def token_mask_of(attention_mask: Tensor | None) -> Tensor | None:
    """The (B, L) real-token mask of a forward: its 2-D attention mask. Padding-free batches
    (position_ids, no attention mask) hold no padding: None, every token is real."""
    return attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None


@dataclass
class ComputeOptions:
    """How the layers compute: none of these changes a result beyond float rounding."""

    reference: bool = False  # use the slow per-expert loop (tests)
    dispatch: str = "auto"  # `ffn` fast path: "dense", "grouped", "sorted" or "auto" (MoEFFN.slot_path)
    # `ffn` inference on CPU runs in pieces of about this many tokens' slots (0: one piece; see
    # MoEFFN._slot_pieces and MoEFFN._fast_blocks)
    cpu_inference_block: int = 512
    contrastive_sample: int = 256  # tokens sampled per router for the contrastive loss


@dataclass
class ForwardState:
    """What a forward routes with; a recomputation under activation checkpointing replays a copy."""

    token_mask: Tensor | None = None  # (B, L) bool, True for real tokens
    adapter_enabled: bool = True  # `disable_adapter` turns it off
    tasks: Blocks = None  # `use_tasks`: the task blocks every token may use; None = all
    task: int | None = None  # `use_tasks` with one task: its index (task routing, per-task statistics)
    sample_tasks: list[SampleGroup] | None = None  # `task_ids`: one group per task in the batch
    packed: bool = False  # sample_tasks' rows are token positions in one packed row (padding-free)
    want_expert_outputs: bool = False  # sample expert outputs for the contrastive loss
    # set on the replayed state when its forward routed without autograd (reentrant checkpointing): the
    # layers attach their recomputed balance losses to their outputs (moetune.core.checkpointing)
    aux_tap: AuxTap | None = None

    def mask_for(self, lead_shape: torch.Size, device: torch.device) -> Tensor:
        """(T,) bool mask for a layer input with leading shape `lead_shape`."""
        T = lead_shape.numel()
        m = self.token_mask
        if m is not None and len(lead_shape) == 2 and m.dim() == 2 and m.shape[0] == lead_shape[0]:
            if m.shape[1] >= lead_shape[1]:  # with a KV cache the mask also covers past tokens
                return m[:, m.shape[1] - lead_shape[1] :].reshape(T).to(device)
        elif m is not None and m.numel() == T:
            return m.reshape(T).to(device)
        return torch.ones(T, dtype=torch.bool, device=device)

    def task_groups(
        self, lead_shape: torch.Size, device: torch.device
    ) -> list[tuple[Tensor | None, Blocks, int | None]]:
        """The tokens that route alike, as (token rows (n,) or None for all, task blocks or None for all,
        task index or None)."""
        groups = self.sample_tasks
        if groups is None:
            return [(None, self.tasks, self.task)]
        if len(groups) == 1:
            return [(None, groups[0][0], groups[0][1])]
        if self.packed:
            tokens = sum(len(rows) for _, _, rows in groups)
            if lead_shape.numel() != tokens:
                raise ValueError(
                    f"task_ids gives a task for the {tokens} tokens of a packed row, but an MoE layer "
                    f"sees inputs of shape {tuple(lead_shape)}"
                )
            return [(rows.to(device), blocks, task) for blocks, task, rows in groups]
        samples = sum(len(rows) for _, _, rows in groups)
        if len(lead_shape) != 2 or lead_shape[0] != samples:
            raise ValueError(
                f"task_ids gives a task for {samples} samples, but an MoE layer sees inputs of shape "
                f"{tuple(lead_shape)}: expected ({samples}, sequence length)"
            )
        S = lead_shape[1]
        steps = torch.arange(S, device=device)
        return [
            ((rows.to(device)[:, None] * S + steps).reshape(-1), blocks, task)
            for blocks, task, rows in groups
        ]


@dataclass
class RouterRecord:
    """One router's decisions in the last forward, for losses."""

    name: str
    routing: Routing
    mask: Tensor  # (T,) bool
    expert_outputs: Tensor | None = None  # (P, E, D) every expert's delta on P sampled tokens
    sample_active: Tensor | None = None  # (P, E) bool
    grad_enabled: bool = True  # autograd was on when routing (off: reentrant activation checkpointing)


@dataclass
class RoutingContext:
    """The state shared by the model wrapper and every layer (see the module docstring)."""

    options: ComputeOptions = field(default_factory=ComputeOptions)
    state: ForwardState = field(default_factory=ForwardState)
    records: list[RouterRecord] | None = None  # filled during a MoEModel forward only (not generate)
    replay: ForwardState | None = None

    def recomputing(self) -> bool:
        """True while autograd's backward re-runs a forward (activation checkpointing). False while
        torch.compile traces: a compiled graph recomputes without running this Python again."""
        if torch.compiler.is_compiling():
            return False
        return self.replay is not None and torch._C._current_graph_task_id() != -1

    def now(self) -> ForwardState:
        """The state to route with: the live one, or the replayed forward's during a recomputation."""
        return self.replay if self.recomputing() else self.state

    def remember(self) -> None:
        """Keep a copy of the live state for the backward of this forward to replay."""
        self.replay = dataclasses.replace(self.state)
