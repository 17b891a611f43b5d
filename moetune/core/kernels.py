"""Autograd kernels of moetune's own: the gated activation that keeps fewer tensors for backward.

`backward_frees_graph` tells a custom Function's backward whether it may write its gradients over the
tensors it saved; `SiluGLU` and the `ffn` slot mixture (`moetune.core.experts`) use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.activations import SiLUActivation


def backward_frees_graph() -> bool:
    """In a custom Function's backward: whether the saved tensors are freed after it (no retain_graph,
    no create_graph), so it may write its gradients over saved tensors it owns. The same test
    AOTAutograd makes before it frees saved tensors early; False under torch.compile, whose traced
    backward manages its own buffers."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    return not torch._C._autograd._get_current_graph_task_keep_graph()


def is_silu(act: Callable[[Tensor], Tensor]) -> bool:
    return isinstance(act, nn.SiLU | SiLUActivation)


def activation_(act: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """act(x), computed in place where `act` is a known elementwise activation (saves writing a fresh
    tensor of the hidden's size); any other activation runs as it is."""
    if is_silu(act):
        return nn.functional.silu(x, inplace=True)
    if isinstance(act, nn.ReLU):
        return x.relu_()
    return act(x)


class SiluGLU(torch.autograd.Function):
    """silu(gate) * up that keeps only gate and up for backward and recomputes silu(gate) there.

    Autograd of the two ops keeps silu(gate) as well and writes it as a separate tensor: for an `ffn`
    layer's K slots that is one more (K, T, F) tensor written and held until backward per layer. The
    gradients are the same formulas as autograd's (same bits).

    `owns_inputs`: gate and up are fresh tensors that nothing else reads after this op, so a backward
    that frees the graph (no retain_graph, the usual training step) writes the two gradients over
    them, as Liger-Kernel's SwiGLU does: two fresh (K, T, F) tensors fewer per layer, whose pages the
    CPU would otherwise fault in on every step. Under retain_graph (double backward included) the
    saved tensors stay intact, and under create_graph the backward is differentiable."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, owns_inputs: bool = False) -> Tensor:
        ctx.save_for_backward(gate, up)
        ctx.owns_inputs = owns_inputs
        return nn.functional.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        gate, up = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: formulas autograd can differentiate again
            sig = torch.sigmoid(gate)
            return grad_h * up * sig * (1 + gate * (1 - sig)), grad_h * gate * sig, None
        reuse = ctx.owns_inputs and backward_frees_graph()
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:  # before grad_up: it reads `gate` and `up` unchanged
            grad_silu = up.mul_(grad_h) if reuse else grad_h * up
            # the silu gradient is written over grad_silu: no second fresh tensor
            grad_gate = torch.ops.aten.silu_backward.grad_input(grad_silu, gate, grad_input=grad_silu)
        if ctx.needs_input_grad[1]:
            grad_up = (nn.functional.silu(gate, inplace=reuse)).mul_(grad_h)
        return grad_gate, grad_up, None


def glu(act: Callable[[Tensor], Tensor], gate: Tensor, up: Tensor, in_place: bool) -> Tensor:
    """act(gate) * up; `in_place`: gate and up are fresh and nothing else reads them, so without
    autograd gate is overwritten, and with it SiluGLU's backward may write its gradients over both."""
    if in_place and not torch.is_grad_enabled():
        return activation_(act, gate).mul_(up)
    if is_silu(act) and torch.is_grad_enabled():
        return SiluGLU.apply(gate, up, in_place)
    return act(gate) * up
