"""Balance losses under reentrant activation checkpointing.

Reentrant checkpointing (`torch.utils.checkpoint(..., use_reentrant=True)`) runs a block's first forward
without autograd and re-runs it with autograd inside backward, where the block's outputs are
back-propagated alone. The balance losses of the first pass therefore carry no graph. As Megatron-LM
does (MoEAuxLossAutoScaler), each MoE layer re-computes its routers' losses in the recomputation and
attaches them to its output: the attachment is the identity forward, and in backward it hands the loss
its gradient, d(final loss) / d(weighted balance loss) — which the first pass's loss term learns from
autograd itself: `weighted_aux_loss()` returns that term through `tap_gradient`, whose backward records
the gradient it receives (with any scaling the caller applied: gradient accumulation, loss scaling).

That term is created after the whole forward, so autograd's engine (which runs the ready node created
last first) reaches it before any checkpointed block's backward; tests compare every gradient with an
uncheckpointed step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class AuxTap:
    """One forward's link between its balance-loss term and the layers' recomputed losses."""

    loss_of: Callable[[Any], Tensor]  # a RouterRecord -> its share of the weighted balance loss (0-dim)
    grad: Tensor | None = None  # d(final loss) / d(weighted balance loss), once backward reached it
    probe: Tensor = field(default_factory=lambda: torch.zeros((), requires_grad=True))


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, probe: Tensor, tap: AuxTap) -> Tensor:
        ctx.tap = tap
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        tap = ctx.tap
        tap.grad = grad.detach() if tap.grad is None else tap.grad + grad.detach()
        return None, None, None


def tap_gradient(value: Tensor, tap: AuxTap) -> Tensor:
    """`value` (no graph) as a term whose gradient, in backward, is recorded in `tap.grad`."""
    return _Tap.apply(value, tap.probe, tap)


class _Attach(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, loss: Tensor, tap: AuxTap) -> Tensor:
        ctx.tap = tap
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        g = ctx.tap.grad
        # no gradient recorded: the caller's loss does not contain the balance losses
        grad_loss = torch.zeros((), device=grad_y.device) if g is None else g.to(grad_y.device)
        return grad_y, grad_loss, None


def attach_losses(y: Tensor, losses: list[Tensor], tap: AuxTap) -> Tensor:
    """`y`, unchanged, carrying the layer's recomputed balance losses into backward."""
    return _Attach.apply(y, torch.stack(losses).sum(), tap)
