"""Where an adapter comes from: the base model it was trained on and the library versions.

`describe(model)` gives the `_base_*` and `_versions` entries of `moetune_config.json`;
`check(...)` compares them with the base an adapter is loaded onto.

The base fingerprint is cheap and deterministic, not a hash of every weight. It is the sha256 of,
for every parameter of the frozen base model (sorted by name, tied weights once, names as in the
base model before injection, whether or not moetune's wrappers are in place):
the name, the dtype, the shape, and `SAMPLE` values at evenly spaced flat indices
(0, (n-1)/(SAMPLE-1), ..., n-1), converted to float64. Buffers (rotary tables, position ids) are
left out. It detects another model, another layer count or size, a re-initialised or fine-tuned
base and a base cast to another dtype; a change confined to unsampled values goes unnoticed.

A quantized weight that is a tensor subclass (torchao's `Int8Tensor`, ...) is fingerprinted by what it
stores, never dequantised: its class name, logical dtype and shape, then for each inner tensor of
`__tensor_flatten__` (integer data, scales, ...) the same record as a plain tensor. So a quantized base
differs from its float original (outputs differ too), and the same quantization of the same weights
gives the same fingerprint. Plain tensors hash exactly as before.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import Tensor, nn

from moetune.core import sharding
from moetune.core.layers import AdapterLayer

SAMPLE = 16  # values sampled per tensor


class BaseMismatchError(ValueError):
    """`from_pretrained(..., strict=True)` onto a base other than the one the adapter was trained on."""


def base_parameters(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of each frozen base parameter, named as in the model before injection."""
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, Tensor]]:
        if isinstance(module, AdapterLayer):
            yield from walk(module.get_base_layer(), prefix)
            return
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield prefix + name, p
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}{name}.")

    yield from walk(model.base_model if hasattr(model, "moe_config") else model, "")


def unshard(tensor: Tensor) -> Tensor:
    """The whole tensor of a parameter sharded by FSDP2 or DeepSpeed ZeRO-3 (gathering it is a collective
    that every rank must call in the same order), any other tensor as it is (`moetune.core.sharding`)."""
    return sharding.full_tensor(tensor)


def fingerprint(model: nn.Module) -> str:
    """`sha256:<hex>` of the base parameters' names, dtypes, shapes and sampled values (module docstring)."""
    digest = hashlib.sha256()
    for name, p in sorted(base_parameters(model), key=lambda item: item[0]):
        p = _saved_layout(p)
        t = unshard(p).detach()  # the parameter itself: a detached ZeRO-3 one loses its `ds_*`
        stored = stored_tensors(t)
        if len(stored) != 1 or stored[0][1] is not t:  # a tensor subclass: class and logical shape first
            digest.update(f"{name}|{type(t).__qualname__}|{t.dtype}|{tuple(t.shape)}\n".encode())
        for suffix, inner in stored:
            _digest_sample(digest, name + suffix, inner)
    return "sha256:" + digest.hexdigest()


def _saved_layout(p: Tensor) -> Tensor:
    """A bitsandbytes 4-bit weight in the layout it is saved and loaded in. bitsandbytes (0.49+) repacks
    it in place for its CPU kernel at the first inference forward (`quant_state.packing_format_for_cpu`);
    this undoes that on a copy (a lossless reordering of the packed bytes, with bitsandbytes' own inverse),
    so the fingerprint does not depend on whether such a forward ran."""
    state = getattr(p, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return p
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    data, _ = _convert_weight_packed_for_cpu_inverse(p.detach().clone(), copy.copy(state))
    return data


def stored_tensors(t: Tensor) -> list[tuple[str, Tensor]]:
    """The plain tensors holding `t`'s values as (name suffix, tensor): `[("", t)]` for a plain tensor,
    the inner tensors of a tensor subclass (`__tensor_flatten__`: a quantized weight's integer data and
    scales), recursively, without dequantising."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if type(t) in (Tensor, nn.Parameter) or flatten is None:
        return [("", t)]
    names, _ = flatten()
    inner = [(n, getattr(t, n)) for n in names]
    return [(f".{n}{sfx}", s) for n, i in inner if isinstance(i, Tensor) for sfx, s in stored_tensors(i)]


def _digest_sample(digest: Any, name: str, t: Tensor) -> None:
    """Name, dtype, shape and `SAMPLE` evenly spaced values of a plain tensor."""
    digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
    n = t.numel()
    if n == 0 or t.device.type == "meta":
        return
    k = min(SAMPLE, n)
    index = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
    values = t.reshape(-1)[index.to(t.device)].to("cpu", torch.float64)
    digest.update(values.numpy().tobytes())


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def describe(model: nn.Module) -> dict[str, Any]:
    """The provenance entries saved in `moetune_config.json` (keys start with `_`)."""
    config = getattr(model, "config", None)
    return {
        "_base_model": getattr(config, "_name_or_path", "") or "",
        "_base_revision": getattr(config, "_commit_hash", None),
        "_base_fingerprint": fingerprint(model),
        "_versions": {p: _version(p) for p in ("moetune", "torch", "transformers", "safetensors")},
    }


def check(model: nn.Module, saved: dict[str, Any], where: str, strict: bool) -> None:
    """Warn (strict: raise `BaseMismatchError`) when `model` is not the base the adapter was trained on."""
    expected = saved.get("_base_fingerprint")
    if expected is None:
        if strict:
            raise BaseMismatchError(
                f"{where}: records no base-model fingerprint (saved by an older moetune), so strict=True "
                "cannot check the base; load with strict=False"
            )
        return
    got = fingerprint(model)
    if got == expected:
        return
    now = getattr(getattr(model, "config", None), "_name_or_path", "") or "?"
    revision = saved.get("_base_revision")
    message = (
        f"{where}: the adapter was trained on base model {saved.get('_base_model') or '?'!r}"
        f"{f' (revision {revision})' if revision else ''} with fingerprint {expected[:23]}, but is loaded "
        f"onto {now!r} with fingerprint {got[:23]}: other weights, shapes or dtype, so its outputs will "
        "differ from training"
    )
    if strict:
        raise BaseMismatchError(message)
    warnings.warn(message, stacklevel=4)
