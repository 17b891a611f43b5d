"""NaN/inf: an error naming the layer, or the optimizer step skipped (skip_nonfinite); dead experts warned."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import TrainerCallback

import moetune
from tests.helpers.models import snapshot, trainer
from tests.helpers.tiny_models import tiny_batch, tiny_model


def test_nonfinite_balance_loss_names_layer_and_loss() -> None:
    """Router logits ~1e35 are finite, their z-loss (logsumexp squared) is not."""
    model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(num_experts=4))
    layer = dict(model.moe_layers())["model.layers.1.mlp"]
    layer.router.weight_blocks[0].data *= 1e36
    with pytest.raises(FloatingPointError, match=r"non-finite z_loss in model\.layers\.1\.mlp"):
        model(**tiny_batch("llama"))
    model.moe_config.skip_nonfinite = True
    model(**tiny_batch("llama"))
    assert "z_loss in model.layers.1.mlp" in model.nonfinite


def poison(t, where: str, micro_batch: int) -> None:
    """NaN in training micro-batch `micro_batch` (0-based): layer 1's input ("router") or the logits."""
    calls = {"n": 0}
    base = t.model.get_base_model()

    def nan_input(module, args, kwargs):
        calls["n"] += module.training
        if module.training and calls["n"] == micro_batch + 1:
            if args:
                return (args[0] * float("nan"), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * float("nan")}
        return None

    def nan_logits(module, args, output):
        calls["n"] += module.training
        if module.training and calls["n"] == micro_batch + 1:
            return output * float("nan")
        return None

    if where == "router":
        base.model.layers[1].register_forward_pre_hook(nan_input, with_kwargs=True)
    else:
        base.lm_head.register_forward_hook(nan_logits)


class Snapshots(TrainerCallback):
    def __init__(self, t) -> None:
        self.t, self.after = t, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.after[state.global_step] = snapshot(self.t)


@pytest.mark.parametrize(
    ("where", "message"),
    [("router", r"non-finite router logits in model\.layers\.1\.mlp"), ("loss", r"non-finite loss")],
)
def test_nonfinite_raises_without_skip(tmp_path, where: str, message: str) -> None:
    t = trainer(str(tmp_path), max_steps=3, save_strategy="no")
    poison(t, where, micro_batch=2)
    with pytest.raises(FloatingPointError, match=message):
        t.train()


@pytest.mark.parametrize("where", ["router", "loss"])
def test_skip_nonfinite_drops_the_step(tmp_path, caplog, where: str) -> None:
    """GA 2: micro-batch 2 opens optimizer step 2, which is skipped whole; steps 1, 3 and 4 train."""
    t = trainer(str(tmp_path), max_steps=4, save_strategy="no", moe={"skip_nonfinite": True})
    poison(t, where, micro_batch=2)
    snaps = Snapshots(t)
    t.add_callback(snaps)
    with caplog.at_level(logging.WARNING, logger="moetune"):
        t.train()
    after = snaps.after
    for key in after[1]:  # weights, router and expert bias: unchanged by step 2
        assert torch.equal(after[1][key], after[2][key]), key
    assert not all(torch.equal(after[2][k], after[3][k]) for k in after[2])
    assert all(torch.isfinite(v).all() for v in after[3].values())
    logged = t.state.log_history[0]  # logging_steps=2: steps 1-2, then 3-4
    assert logged["moe/skipped_steps"] == 1 and t.state.log_history[1]["moe/skipped_steps"] == 0
    assert all(v == v for k, v in logged.items() if k.startswith("moe/"))  # no NaN from the skipped step
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "optimizer step 2 skipped" in skipped[0]
    assert ("layers.1.mlp" in skipped[0]) == (where == "router")
    opt_steps = {int(s["step"]) for s in t.optimizer.state_dict()["state"].values()}
    assert opt_steps == {3}  # AdamW moved 3 times: step 2 left its moments and counters alone


def test_dead_expert_is_warned_once_with_its_layer(tmp_path, caplog) -> None:
    t = trainer(str(tmp_path), max_steps=4, save_strategy="no", moe={"dead_expert_steps": 2})
    for _, layer in t.model.moe_layers():
        layer.router.expert_bias[3] = -10.0  # selection uses p + b: expert 3 is never chosen
    with caplog.at_level(logging.WARNING, logger="moetune"):
        t.train()
    warned = [r.getMessage() for r in caplog.records if "received no token" in r.getMessage()]
    layers = [name for name, _ in t.model.moe_layers()]
    assert sorted(warned) == sorted(
        f"moetune: expert 3 of {name} received no token for 2 consecutive optimizer steps (up to step 2): "
        "it is dead; consider aux_loss_coef or bias_update_rate"
        for name in layers
    )


def test_dead_expert_steps_validated() -> None:
    with pytest.raises(ValueError, match="dead_expert_steps=-1"):
        moetune.MoEConfig(dead_expert_steps=-1)
