"""Adapter files: `moetune_config.json` + `moetune_model.safetensors`, never a base weight.

Files are written to a temporary name in the same directory, flushed to disk and renamed, so a
crash leaves either the old file or the new one. Loading reads safetensors only (no pickle) and
checks every tensor's name and shape against the model before copying anything.
"""

from __future__ import annotations

import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from moetune.config import MoEConfig
from moetune.injection import eject

if TYPE_CHECKING:
    from moetune.model import MoEModel

WEIGHTS_NAME = "moetune_model.safetensors"
BASE_PREFIXES = ("base_layer.", "original.")  # the frozen module inside each wrapper


def adapter_state_dict(model: MoEModel) -> dict[str, Tensor]:
    """Every tensor moetune added (experts, routers, their bias, LoRA, trained copies), by full name."""
    state = {}
    for name, module in model.adapter_modules():
        for key, tensor in module.state_dict().items():
            if not key.startswith(BASE_PREFIXES) and ".base_layer." not in key:
                state[f"{name}.{key}"] = tensor
    return state


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_write(path, write)


def _moetune_version() -> str:
    try:
        return version("moetune")
    except PackageNotFoundError:
        return "unknown"


def save_adapter(model: MoEModel, directory: str | os.PathLike) -> None:
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    _atomic_write(
        os.path.join(directory, WEIGHTS_NAME),
        lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "moetune": _moetune_version()}),
    )
    base = getattr(getattr(model.base_model, "config", None), "_name_or_path", "") or ""
    model.moe_config.save(directory, extra={"_base_model": base, "_moetune_version": _moetune_version()})


def load_adapter(
    cls: type[MoEModel], base: nn.Module, path: str | os.PathLike, is_trainable: bool
) -> MoEModel:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such adapter directory")
    config, _ = MoEConfig.load(path)
    trainable = {n: p.requires_grad for n, p in base.named_parameters()}
    model = cls(base, config)
    try:
        load_adapter_weights(model, path)
    except Exception:
        eject(base, trainable)  # leave the caller's model as it was
        raise
    if not is_trainable:
        for _, module in model.adapter_modules():
            module.requires_grad_(False)
        model.eval()
    return model


def load_adapter_weights(model: MoEModel, directory: str | os.PathLike) -> None:
    """Copy `moetune_model.safetensors` into an injected model, after checking every name and shape."""
    weights = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: no moetune adapter weights here")
    expected = adapter_state_dict(model)
    try:
        with safe_open(weights, framework="pt") as fh:
            saved = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:  # safetensors raises its own error types without the file name
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not fit this base model: {len(missing)} adapter tensors missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); was it trained "
            "on another architecture or layer count?"
        )
    for key, tensor in saved.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{weights}: tensor {key} has shape {tuple(tensor.shape)} but this base model needs "
                f"{tuple(expected[key].shape)}; was the adapter trained on another base model?"
            )
    with torch.no_grad():
        for key, tensor in saved.items():
            expected[key].copy_(tensor)
