"""Parameters sharded across data-parallel ranks: FSDP2 (`fully_shard`, DTensor) and DeepSpeed ZeRO-3.

Each rank holds a piece of such a parameter; moetune needs the whole value where it reads weights outside
a forward (saving the adapter, the base fingerprint) and writes it where it loads an adapter into a
sharded model. Gathering is a collective: every rank must make the same calls in the same order.

Inside a forward, FSDP2 unshards every parameter under the module that `fully_shard` wrapped: wrap the
decoder layers, never one of moetune's modules alone (a `LoRAExperts` or a router's weight blocks are
read by their parent's forward; their own forward never runs). DeepSpeed ZeRO-3 gathers a module's
own parameters when its forward runs, and a parameter read inside another module's forward on first
access (it then registers it as that module's "external parameter"): moetune's layers need nothing
more. Do not make them DeepSpeed "leaf modules" (`zero_optimization.leaf_module`, meant for MoE blocks):
DeepSpeed then reduces a leaf's gradients in a full backward hook, which fires before they exist when
the layer's input does not require grad (the first layers over a frozen embedding).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


def is_zero3(tensor: Tensor) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (it carries a `ds_id`; its `.data` may be empty)."""
    return hasattr(tensor, "ds_id")


def is_dtensor(tensor: Tensor) -> bool:
    """An FSDP2 shard (a DTensor)."""
    return callable(getattr(tensor, "full_tensor", None))


def full_shape(tensor: Tensor) -> torch.Size:
    """The whole tensor's shape (a ZeRO-3 parameter's own `.shape` is (0,) while it is partitioned)."""
    return getattr(tensor, "ds_shape", tensor.shape)


@contextmanager
def gathered(params: Iterable[Tensor], modify: bool = False) -> Iterator[None]:
    """Within the block, ZeRO-3 parameters among `params` hold their whole value (a collective; others
    are left alone). modify=True: rank 0's values are partitioned again on exit (every rank must write
    the same values)."""
    zero3 = [p for p in params if is_zero3(p)]
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if modify else None):
        yield


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole value of a sharded parameter (a gathered copy: a collective), any other tensor as it is."""
    return full_tensors({"": tensor})[""]


def full_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """`full_tensor` of each value, the ZeRO-3 parameters gathered in one collective; detached."""
    with gathered(tensors.values()):
        return {
            k: (t.full_tensor() if is_dtensor(t) else t.data.clone() if is_zero3(t) else t).detach()
            for k, t in tensors.items()
        }


@torch.no_grad()
def copy_full(target: Tensor, value: Tensor) -> None:
    """`target.copy_(value)` where `value` is the whole tensor and `target` may be sharded: an FSDP2 shard
    takes its own piece of `value` (no communication: every rank holds the same `value`); a ZeRO-3
    parameter must be inside `gathered(..., modify=True)`."""
    if is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        value = value.to(device=target.device, dtype=target.dtype)
        target.copy_(distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None))
    else:
        target.copy_(value)
