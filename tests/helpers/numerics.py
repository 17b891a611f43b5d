"""Random adapters, and one forward + backward to compare a fast path with the reference one."""

from __future__ import annotations

import torch

import moetune
from moetune.core.experts import LoRAExperts
from tests.helpers.tiny_models import tiny_model


def randomize_(
    model: moetune.MoEModel, seed: int = 0, tie: bool = False, lora_std: float = 0.3, router_std: float = 1.0
) -> None:
    """Nonzero A and B (N(0, lora_std^2)), spread-out routers (N(0, router_std^2)); with `tie`, experts 0
    and 1 get identical router rows."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRAExperts):
            for p in [*module.lora_A, *module.lora_B]:
                p.data = torch.randn(p.shape, generator=g, dtype=p.dtype) * lora_std
    for _, layer in model.moe_layers():
        for w in layer.router.weight_blocks:  # one block per task
            w.data = torch.randn(w.shape, generator=g, dtype=w.dtype) * router_std
        if tie:
            w = layer.router.weight_blocks[0]
            w.data[1] = w.data[0]


def run(
    model: moetune.MoEModel, batch: dict, reference: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    if reference:
        with model.reference_path():
            out = model(**batch)
    else:
        out = model(**batch)
    logits = out.logits
    probe = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype, device=logits.device)
    probe = probe.view_as(logits)
    ((logits * probe).sum() + model.weighted_aux_loss()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return logits.detach(), grads


def max_rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in b)


def assert_paths_agree(model: moetune.MoEModel, batch: dict) -> None:
    """Fast and reference paths: the same logits and gradients (float64 tolerances)."""
    model.train()  # dropout 0 and jitter 0: routing is deterministic, gradients flow
    fast_out, fast_grads = run(model, batch, reference=False)
    ref_out, ref_grads = run(model, batch, reference=True)
    torch.testing.assert_close(fast_out, ref_out, rtol=1e-10, atol=1e-10)
    assert fast_grads.keys() == ref_grads.keys()
    assert any("lora_B" in n for n in fast_grads)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def float64_model(family: str, expert_type: str, router: str, **overrides) -> moetune.MoEModel:
    """A float64 model whose fast and reference paths must agree to rounding (small capacity: switch
    overflows)."""
    cfg = dict(
        expert_type=expert_type,
        router=router,
        num_experts=4,
        top_k=2,
        r=3,
        lora_dropout=0.0,
        router_dtype="float64",
        capacity_factor=0.5,
        num_shared_experts=1 if router == "topk" else 0,
        importance_loss_coef=0.1,
        aux_loss_coef=0.0 if router == "soft" else 0.01,
    )
    base = tiny_model(family, dtype=torch.float64)
    return moetune.get_moe_model(base, moetune.MoEConfig(**cfg | overrides))
