"""The balance losses of one forward: per router, averaged over routers, weighted, checked finite; and
the aux-loss-free bias update.

Every MoE layer leaves a `RouterRecord` per forward. Each router's losses come from
`moetune.core.losses`; the model's loss of each kind is their mean over routers (a layer routing the
samples of several tasks apart counts once per task group), and `out.loss` adds
sum_l coef_l * loss_l over the kinds whose coefficient is on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moetune.config import MoEConfig
from moetune.core import losses, stats
from moetune.core.context import RouterRecord
from moetune.core.routing import Router

COEFFICIENTS = {  # loss -> the MoEConfig field weighting it
    "aux_loss": "aux_loss_coef",
    "z_loss": "z_loss_coef",
    "importance_loss": "importance_loss_coef",
    "contrastive_loss": "contrastive_loss_coef",
}


def router_losses(record: RouterRecord, config: MoEConfig, with_contrastive: bool) -> dict[str, Tensor]:
    """One router's losses: `losses.balance_losses`, and the expert-contrastive loss when asked."""
    out = losses.balance_losses(record.routing, record.mask)
    if with_contrastive:
        out["contrastive_loss"] = losses.contrastive_loss(
            record.expert_outputs,
            record.sample_active,
            mode=config.contrastive_mode,
            temperature=config.contrastive_temperature,
        )
    return out


def per_router(records: list[RouterRecord], config: MoEConfig) -> dict[str, Tensor]:
    """Each loss per router: name -> (R,) in the order of `records`."""
    with_contrastive = config.contrastive_loss_coef > 0 and records[0].expert_outputs is not None
    values: dict[str, list[Tensor]] = {}
    for record in records:
        for name, value in router_losses(record, config, with_contrastive).items():
            values.setdefault(name, []).append(value)
    return {name: torch.stack(vals) for name, vals in values.items()}


def mean_over_routers(losses_R: dict[str, Tensor]) -> dict[str, Tensor]:
    """name -> (R,)  to  name -> 0-dim: each loss averaged over the routers."""
    return {name: values.mean() for name, values in losses_R.items()}


def weighted_terms(values: dict[str, Tensor], config: MoEConfig) -> list[Tensor]:
    """coef * loss for each loss whose coefficient is on."""
    coefs = {name: getattr(config, COEFFICIENTS[name]) for name in values}
    return [coefs[name] * value for name, value in values.items() if coefs[name] > 0]


def nonfinite_problem(
    records: list[RouterRecord],
    losses_R: dict[str, Tensor],
    router_of: Callable[[str], Router],
    router_dtype: str,
) -> str | None:
    """What is NaN/inf in a forward's routing, naming the first layer: its router logits (real tokens
    only; then whether the router's weights or the layer's input is to blame) or its losses. None when
    everything is finite (one host sync)."""
    logits_ok_R = torch.stack([(r.routing.logits.isfinite().all(-1) | ~r.mask).all() for r in records])
    ok_R = logits_ok_R
    if losses_R:
        losses_ok_XR = torch.stack([values.isfinite() for values in losses_R.values()])
        ok_R = logits_ok_R & losses_ok_XR.all(0)
    if bool(ok_R.all()):
        return None
    i = int((~ok_R).nonzero()[0, 0])
    name = records[i].name
    if not logits_ok_R[i]:
        bad = [n for n, p in router_of(name).named_parameters() if not bool(p.isfinite().all())]
        cause = (
            f"its router's {', '.join(bad)} hold NaN/inf"
            if bad
            else "the router's weights are finite, so the input to this layer holds NaN/inf (or the "
            f"logits overflow router_dtype={router_dtype})"
        )
        return f"non-finite router logits in {name}: {cause}"
    bad = [loss for loss, ok in zip(losses_R, losses_ok_XR[:, i].tolist(), strict=True) if not ok]
    return f"non-finite {', '.join(bad)} in {name} (its router logits are finite)"


def update_expert_bias(router: Router, rate: float) -> None:
    """Aux-loss-free balancing (Wang et al. 2024; DeepSeek-V3), once per optimizer step:
    b_i += u * sign(mean_j c_j - c_i), with c the tokens each expert got since the last update, summed
    over data-parallel ranks. Only experts whose router rows train move."""
    counts = stats.all_reduce_sum(router.step_counts)
    step = (rate * torch.sign(counts.mean() - counts)).to(router.expert_bias.dtype)
    # the bias of experts whose router rows are frozen (add_experts(freeze_existing=True)) stays
    router.expert_bias += torch.where(router.trainable_experts(), step, torch.zeros_like(step))
    router.step_counts.zero_()
