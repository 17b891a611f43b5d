"""Adapter files: `moetune_model.safetensors` (the adapter) + `moetune_config.json` (a readable copy).

Format 1. The safetensors file is the adapter, complete on its own: the adapter tensors (never a base
weight) and, in its string metadata, `moetune_format` ("1"), `moetune_config` (the exact text of
`moetune_config.json`: the MoEConfig fields plus the provenance of `moetune.io.provenance`) and
`moetune_sha256` (JSON: tensor name -> sha256 over its dtype, shape and raw bytes, see `tensor_sha256`).

Atomic replacement: each file is written to a temporary name in the same directory, fsynced, renamed
over the old one, and the directory is fsynced; the safetensors file goes first. Its rename is the
commit point: before it the complete old adapter is on disk, after it the complete new one, whatever
became of the json. Loading takes the config from the safetensors file and warns when
`moetune_config.json` says otherwise (an interrupted save or a hand edit). Files without the metadata
(written before format 1) load with the json's config and without checksums.

Loading reads safetensors only (no pickle), verifies every checksum, and checks every tensor's name and
shape against the model before copying anything. Every failure names the file and the problem:
`FileNotFoundError` for a missing path, `AdapterError` (a ValueError) for the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from moetune.config import CONFIG_NAME, MoEConfig
from moetune.core import sharding
from moetune.core.injection import eject
from moetune.core.layers import adapter_modules
from moetune.io import provenance
from moetune.io.atomic import atomic_write, atomic_write_text


class AdaptedModel(Protocol):
    """What the adapter files are read from and written to: a base model holding moetune's adapter
    modules, and the config they were built from (`moetune.MoEModel` is one)."""

    base_model: nn.Module
    moe_config: MoEConfig


Adapted = TypeVar("Adapted", bound=AdaptedModel)

WEIGHTS_NAME = "moetune_model.safetensors"
FORMAT_VERSION = "1"
META_FORMAT, META_CONFIG, META_SHA256 = "moetune_format", "moetune_config", "moetune_sha256"
BASE_PREFIXES = ("base_layer.", "original.")  # the frozen module inside each wrapper


class AdapterError(ValueError):
    """An adapter that cannot be loaded: unreadable, corrupted, or not fitting the base model."""


def adapter_state_dict(model: AdaptedModel) -> dict[str, Tensor]:
    """Every tensor moetune added (experts, routers, their bias, LoRA, trained copies), by full name.

    Under FSDP2 or DeepSpeed ZeRO-3 the sharded tensors are gathered whole (copies): a collective, so
    every rank must call it. Unsharded tensors are the model's own (detached, sharing storage)."""
    return sharding.full_tensors(_adapter_tensors(model))


def _adapter_tensors(model: AdaptedModel) -> dict[str, Tensor]:
    """The adapter's parameters and buffers themselves (sharded ones as they are), by full name."""
    state = {}
    for name, module in adapter_modules(model.base_model):
        for key, tensor in _wrapper_state(module):
            if ".base_layer." not in key:
                state[f"{name}.{key}"] = tensor
    return state


def _wrapper_state(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """`module.state_dict(keep_vars=True)` items less the frozen module it wraps (`BASE_PREFIXES`), whose
    `state_dict` is never called: it may change the base (bitsandbytes 0.50 on CPU unpacks a 4-bit weight
    that an inference forward repacked, in place and not exactly)."""
    yield from ((k, t) for k, t in module._parameters.items() if t is not None)
    persistent = module._buffers.keys() - module._non_persistent_buffers_set
    yield from ((k, t) for k, t in module._buffers.items() if t is not None and k in persistent)
    for name, child in module.named_children():
        if f"{name}." not in BASE_PREFIXES:
            yield from child.state_dict(prefix=f"{name}.", keep_vars=True).items()


def tensor_sha256(tensor: Tensor) -> str:
    """sha256 hex digest of `"<dtype>|<shape>|"` followed by the tensor's raw (little-endian) bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ---- writing ---------------------------------------------------------------------------------------
def save_adapter(model: AdaptedModel, directory: str | os.PathLike, write: bool = True) -> None:
    """Replace the adapter in `directory` atomically (see the module docstring). A sharded model is
    gathered first, on every rank (a collective); only ranks with `write` write the files."""
    directory = os.fspath(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    record = model.moe_config.to_dict() | provenance.describe(model.base_model)
    if not write:
        return
    os.makedirs(directory, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=True)
    metadata = {
        "format": "pt",
        META_FORMAT: FORMAT_VERSION,
        META_CONFIG: text,
        META_SHA256: json.dumps({k: tensor_sha256(t) for k, t in tensors.items()}, sort_keys=True),
    }
    atomic_write(
        os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata=metadata)
    )
    atomic_write_text(os.path.join(directory, CONFIG_NAME), text)


# ---- reading ---------------------------------------------------------------------------------------
def read_weights(weights: str, tensors: bool = True) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors) of one safetensors file, read through one handle; checksums verified."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: no moetune adapter weights here")
    try:
        with safe_open(weights, framework="pt") as fh:
            metadata = fh.metadata() or {}
            saved = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else {}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types without the file name
        raise AdapterError(
            f"{weights}: not a readable safetensors file (truncated, corrupted or another format: {err})"
        ) from None
    if tensors:
        _verify(weights, saved, metadata)
    return metadata, saved


def _verify(weights: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    if META_SHA256 not in metadata:
        if META_FORMAT in metadata:
            raise AdapterError(f"{weights}: the metadata has lost the tensor checksums ({META_SHA256})")
        return  # written before format 1: nothing to check against
    expected = _json(metadata[META_SHA256], f"{weights}: metadata {META_SHA256}")
    if not isinstance(expected, dict) or set(expected) != set(tensors):
        raise AdapterError(
            f"{weights}: holds tensors other than those whose checksums were recorded at save "
            f"({sorted(set(tensors) ^ set(expected if isinstance(expected, dict) else {}))[:3]})"
        )
    for key, tensor in tensors.items():
        if tensor_sha256(tensor) != expected[key]:
            raise AdapterError(
                f"{weights}: tensor {key} fails its sha256 checksum: the file was corrupted or changed "
                "after it was saved"
            )


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        raise AdapterError(f"{where}: not valid JSON ({err})") from None


def read_config(
    directory: str | os.PathLike, metadata: dict[str, str] | None = None
) -> tuple[MoEConfig, dict[str, Any]]:
    """(config, provenance extras) of an adapter: from its safetensors metadata, else the json (old files)."""
    directory = os.fspath(directory)
    weights, json_path = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, CONFIG_NAME)
    if metadata is None:
        metadata, _ = read_weights(weights, tensors=False)
    if META_CONFIG not in metadata:
        return MoEConfig.load(directory)
    data = _json(metadata[META_CONFIG], f"{weights}: metadata {META_CONFIG}")
    if not isinstance(data, dict):
        raise AdapterError(f"{weights}: metadata {META_CONFIG} is not a JSON object")
    if os.path.isfile(json_path):
        try:
            with open(json_path, encoding="utf-8") as fh:
                on_disk = json.load(fh)
        except (OSError, ValueError):
            on_disk = None
        if on_disk != data:
            other = on_disk if isinstance(on_disk, dict) else {}
            keys = sorted(k for k in data.keys() | other.keys() if data.get(k) != other.get(k))
            warnings.warn(
                f"{json_path} differs from the config stored in {weights} (keys {keys[:5]}): an interrupted "
                f"save or a hand edit; using the config in {WEIGHTS_NAME}",
                stacklevel=3,
            )
    extras = {k: data.pop(k) for k in list(data) if k.startswith("_")}
    try:
        return MoEConfig.from_dict(data, where=weights), extras
    except (ValueError, TypeError) as err:
        raise AdapterError(f"{weights}: bad config ({err})") from None


def load_adapter(
    build: Callable[[nn.Module, MoEConfig], Adapted],
    base: nn.Module,
    path: str | os.PathLike,
    is_trainable: bool,
    strict: bool = False,
) -> Adapted:
    """`MoEModel.from_pretrained`: read, verify, inject (`build(base, config)`), copy, check the base;
    `base` intact on error."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such adapter directory")
    weights = os.path.join(path, WEIGHTS_NAME)
    metadata, tensors = read_weights(weights)
    config, extras = read_config(path, metadata)
    trainable = {n: p.requires_grad for n, p in base.named_parameters()}
    model = build(base, config)
    try:
        _copy_checked(model, tensors, weights)
        provenance.check(model, extras, path, strict)
    except Exception:
        eject(base, trainable)  # leave the caller's model as it was
        raise
    if not is_trainable:
        for _, module in adapter_modules(model.base_model):
            module.requires_grad_(False)
        model.eval()
    return model


def load_adapter_weights(model: AdaptedModel, directory: str | os.PathLike) -> None:
    """Copy `moetune_model.safetensors` into an injected model, after checking checksums, names, shapes."""
    weights = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    _, tensors = read_weights(weights)
    _copy_checked(model, tensors, weights)


def _copy_checked(model: AdaptedModel, saved: dict[str, Tensor], weights: str) -> None:
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"{weights} does not fit this base model: {len(missing)} adapter tensors missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); was it trained "
            "on another architecture or layer count?"
        )
    for key, tensor in saved.items():
        if tensor.shape != expected[key].shape:
            raise AdapterError(
                f"{weights}: tensor {key} has shape {tuple(tensor.shape)} but this base model needs "
                f"{tuple(expected[key].shape)}; was the adapter trained on another base model?"
            )
    targets = _adapter_tensors(model)
    with sharding.gathered(targets.values(), modify=True):  # ZeRO-3: written whole, partitioned again
        for key, tensor in saved.items():
            sharding.copy_full(targets[key], tensor)  # an FSDP2 shard takes its piece
