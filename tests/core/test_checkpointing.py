"""Activation checkpointing (transformers' gradient_checkpointing_enable) re-runs each layer's forward
inside backward: the recomputation must route like the first pass and count nothing twice."""

from __future__ import annotations

import pytest
import torch

import moetune
from tests.helpers.numerics import randomize_
from tests.helpers.tiny_models import tiny_batch, tiny_model


def _step(checkpointing: bool, router: str, contrastive: float, reentrant: bool = False) -> dict:
    torch.manual_seed(0)
    base = tiny_model("llama")
    cfg = moetune.MoEConfig(
        router=router,
        num_experts=4,
        lora_dropout=0.1,  # dropout and jitter draw random numbers: the recomputation must replay them
        router_jitter=0.05,
        attn_r=4,
        bias_update_rate=0.01,
        importance_loss_coef=0.1,
        contrastive_loss_coef=contrastive,
        capacity_factor=1.0,
    )
    model = moetune.get_moe_model(base, cfg)
    randomize_(model)
    if checkpointing:  # non-reentrant by default; transformers 5's name and the older one
        if reentrant:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        else:
            model.activation_checkpointing_enable()
        assert model.base_model.is_activation_checkpointing
    model.train()
    torch.manual_seed(1)
    out = model(**tiny_batch("llama", batch=3, seq=9, padded=True))
    out.loss.backward()
    stats = model.routing_stats()
    return {
        "loss": out.loss.detach(),
        "aux": {k: v.detach() for k, v in model.aux_losses().items()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "tokens": {name: s["tokens_per_expert"] for name, s in stats.items()},
        "step_counts": [layer.router.step_counts.clone() for _, layer in model.moe_layers()],
    }


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("router,contrastive", [("topk", 0.0), ("switch", 0.0), ("topk", 0.1)])
def test_checkpointing_changes_nothing(router: str, contrastive: float, reentrant: bool) -> None:
    """Loss, balance losses, every gradient (routers included: the balance losses reach them also when
    the reentrant variant's first forward ran without autograd) and the statistics equal a plain step."""
    plain, ckpt = _step(False, router, contrastive), _step(True, router, contrastive, reentrant)
    torch.testing.assert_close(ckpt["loss"], plain["loss"], rtol=1e-6, atol=1e-7)
    assert ckpt["aux"].keys() == plain["aux"].keys()
    for name in plain["aux"]:
        torch.testing.assert_close(ckpt["aux"][name], plain["aux"][name], rtol=1e-6, atol=1e-7)
    assert ckpt["grads"].keys() == plain["grads"].keys()
    assert any("router" in n for n in plain["grads"])
    for name in plain["grads"]:
        torch.testing.assert_close(ckpt["grads"][name], plain["grads"][name], rtol=1e-5, atol=1e-7, msg=name)
    assert ckpt["tokens"] == plain["tokens"]  # statistics counted once
    for a, b in zip(ckpt["step_counts"], plain["step_counts"], strict=True):
        assert torch.equal(a, b)  # bias token counts once
    assert sum(sum(t) for t in plain["tokens"].values()) > 0


def test_reentrant_balance_losses_follow_the_callers_scaling() -> None:
    """The gradient the balance losses get is the one their term in the caller's loss receives: a loss
    scaled by 1/4 (gradient accumulation) scales the router gradients by 1/4; a loss without the balance
    term gives the routers only the task loss's gradient."""
    grads = {}
    for reentrant in (False, True):
        torch.manual_seed(0)
        model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(num_experts=4, lora_dropout=0.0))
        randomize_(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        batch = tiny_batch("llama", batch=2, seq=6)
        model.balance_losses_in_output = False
        out = model(**batch)
        (out.loss / 4 + model.weighted_aux_loss() / 4).backward()
        scaled = {n: p.grad.clone() for n, p in model.named_parameters() if "router" in n}
        model.zero_grad()
        model(**batch).loss.backward()  # the task loss alone
        task_only = {n: p.grad.clone() for n, p in model.named_parameters() if "router" in n}
        grads[reentrant] = scaled, task_only
    for plain, ckpt in zip(grads[False], grads[True], strict=True):
        assert plain.keys() == ckpt.keys() and plain
        for name in plain:
            torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-8, msg=name)
    scaled, task_only = grads[True]
    assert any(not torch.allclose(scaled[n] * 4, task_only[n]) for n in scaled)  # the balance term counts


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_forward_without_autograd_between_forward_and_backward_changes_nothing(reentrant: bool) -> None:
    """DPO's pattern: the policy forward, the reference forward (no autograd, adapter off), then the
    policy's backward. The recomputation replays the policy forward: the same gradients as without the
    reference forward in between."""
    grads = []
    for reference_pass in (False, True):
        torch.manual_seed(0)
        model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(num_experts=4, lora_dropout=0.1))
        randomize_(model)
        model.activation_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        batch = tiny_batch("llama", batch=3, seq=9, padded=True)
        torch.manual_seed(1)
        out = model(**batch)
        if reference_pass:
            with torch.no_grad(), model.disable_adapter():
                model(**tiny_batch("llama", batch=2, seq=5, seed=7))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_B" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
