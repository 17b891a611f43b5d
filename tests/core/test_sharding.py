"""Sharding helpers and the shipped FSDP2 config, on the CPU (the sharded runs: tests/test_distributed.py,
tests/test_deepspeed.py, and on a GPU tests/test_cuda.py).

accelerate runs FSDP only on accelerator devices, so examples/accelerate/fsdp2.yaml is checked here the
way `accelerate launch` reads it: its environment, accelerate's FSDP plugin, and the auto-wrap policy
that plugin applies to a moetune model. It must shard whole decoder layers and never one of moetune's
modules on its own (their parent's forward reads their weights; a unit of its own would stay sharded).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moetune
from moetune.core import sharding
from moetune.core.layers import LoRALinear, RoutedLayer
from tests.helpers import REPO
from tests.helpers.tiny_models import tiny_model


def _fsdp_plugin(config: Path, monkeypatch: pytest.MonkeyPatch):
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", "x.py"])
    args, _, _ = _validate_launch_command(args)
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    return FullyShardedDataParallelPlugin()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_example_fsdp2_config_wraps_decoder_layers_only(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin = _fsdp_plugin(REPO / "examples" / "accelerate" / "fsdp2.yaml", monkeypatch)
    assert plugin.fsdp_version == 2
    model = moetune.get_moe_model(tiny_model(family), moetune.MoEConfig(num_experts=4, attn_r=4))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    layer_class = type(model.get_base_model()).__name__.replace("ForCausalLM", "").replace("LMHeadModel", "")
    assert len(wrapped) == 2  # tiny models have 2 decoder layers
    assert all(layer_class in type(model.get_submodule(name)).__name__ for name in wrapped)
    moetune_modules = [m for m in model.modules() if isinstance(m, (RoutedLayer, LoRALinear))]
    assert moetune_modules and not any(policy(m) for m in moetune_modules)
    for m in moetune_modules:  # every moetune module lies inside a wrapped layer
        assert any(any(m is sub for sub in model.get_submodule(name).modules()) for name in wrapped)


def test_helpers_leave_unsharded_tensors_alone() -> None:
    """Without FSDP2 or ZeRO-3: the tensors themselves (no copy, no collective), plain copies."""
    t = torch.arange(6.0).view(2, 3)
    full = sharding.full_tensors({"t": t})["t"]
    assert full.data_ptr() == t.data_ptr() and sharding.full_shape(t) == (2, 3)
    with sharding.gathered([t], modify=True):
        sharding.copy_full(t, torch.ones(2, 3))
    assert torch.equal(t, torch.ones(2, 3))
    assert not sharding.is_zero3(t) and not sharding.is_dtensor(t)
