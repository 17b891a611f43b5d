"""MoETrainer: loss scaling, optimizer groups, bias updates, logs, adapter-only checkpoints, exact resume."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.models import dataset, snapshot, trainer


def test_resume_is_bitwise_exact(tmp_path) -> None:
    """lr > 0, dropout, jitter, bias balancing, accumulation 2, a mid-epoch checkpoint (40 rows = 5 steps)."""
    full = trainer(str(tmp_path / "a"))
    full.train()
    expected = snapshot(full)
    trainer(str(tmp_path / "b"), max_steps=8).train()  # writes checkpoint-3 ... then we resume from 3
    resumed = trainer(str(tmp_path / "b"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    got = snapshot(resumed)
    assert expected.keys() == got.keys()
    assert any("expert_bias" in k and expected[k].abs().sum() > 0 for k in expected)  # the bias moved
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_checkpoint_holds_the_adapter_only(tmp_path) -> None:
    t = trainer(str(tmp_path), max_steps=3)
    t.train()
    files = set(os.listdir(tmp_path / "checkpoint-3"))
    assert {"moetune_model.safetensors", "moetune_config.json", "optimizer.pt", "scheduler.pt"} <= files
    assert not any(f.startswith("model") for f in files)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "checkpoint-3" / "moetune_model.safetensors"), "pt") as fh:
        assert not any("base_layer" in k for k in fh.keys())  # noqa: SIM118


def test_router_group_and_logs(tmp_path) -> None:
    t = trainer(str(tmp_path), max_steps=2)
    t.train()
    groups = t.optimizer.param_groups
    router_params = {id(p) for _, layer in t.model.moe_layers() for p in layer.router.parameters()}
    router_group = [g for g in groups if {id(p) for p in g["params"]} == router_params]
    assert len(router_group) == 1 and router_group[0]["weight_decay"] == 0.0
    assert router_group[0]["initial_lr"] == pytest.approx(3.0 * 1e-2)
    assert all(g["initial_lr"] == pytest.approx(1e-2) for g in groups if g is not router_group[0])
    logged = t.state.log_history[0]
    for key in ("moe/aux_loss", "moe/z_loss", "moe/importance_loss", "moe/load_cv", "moe/dead_experts"):
        assert key in logged


def test_bias_moves_once_per_optimizer_step(tmp_path) -> None:
    t = trainer(str(tmp_path), max_steps=1)
    t.train()
    for _, layer in t.model.moe_layers():
        bias = layer.router.expert_bias
        steps = bias.abs() / 0.01  # one step of size u per optimizer step, not one per micro-batch (GA = 2)
        assert torch.allclose(steps, steps.round()) and steps.max() == pytest.approx(1.0)
        assert layer.router.step_counts.sum() == 0


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_balance_loss_scaling(tmp_path, accepts_loss_kwargs: bool) -> None:
    """loss = task + balance / GA when the Trainer will not divide it (num_items_in_batch), else + balance."""
    t = trainer(str(tmp_path))
    t.model_accepts_loss_kwargs = accepts_loss_kwargs
    t.current_gradient_accumulation_steps = 2
    model = t.model.train()
    batch = {k: torch.tensor(v) for k, v in dataset()[:4].items()}
    n_items = int((batch["labels"][:, 1:] != -100).sum()) * 2  # as if the other micro-batch had as many
    torch.manual_seed(5)
    loss = t.compute_loss(model, dict(batch), num_items_in_batch=n_items if accepts_loss_kwargs else None)
    balance = model.weighted_aux_loss()
    torch.manual_seed(5)
    model.balance_losses_in_output = False
    kwargs = {"num_items_in_batch": n_items} if accepts_loss_kwargs else {}
    task = model(**batch, **kwargs).loss
    model.balance_losses_in_output = True
    expected = task + (balance / 2 if accepts_loss_kwargs else balance)
    torch.testing.assert_close(loss, expected)


def test_label_smoothing_keeps_balance_losses(tmp_path) -> None:
    t = trainer(str(tmp_path), label_smoothing_factor=0.1)
    model = t.model.eval()
    batch = {k: torch.tensor(v) for k, v in dataset()[:4].items()}
    loss = t.compute_loss(model, dict(batch))
    balance = model.weighted_aux_loss()
    smoothed = t.label_smoother(model(**batch), batch["labels"], shift_labels=True)
    torch.testing.assert_close(loss, smoothed + balance)
