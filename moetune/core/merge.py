"""Merge a MoE-LoRA adapter into the base weights (peft's `merge_and_unload`), where that is exact.

A LoRA delta merges as  W' = W + s B A  (Hu et al. 2021; transformers' Conv1D stores W as (in, out), so
W' = W + (s B A)^T there). A mixture of experts merges only where it is the same for every token:

  * each MoE layer's fixed mixture (`fixed_mixture`): every token gets the same weight g_i on expert i.
    The router must leave one routed expert (num_experts=1, or `use_tasks` / `task=` restricted to a
    task that owns one), whose weight is then 1 for topk, topp and soft; for switch only with
    capacity_factor >= 1 (capacity ceil(cf T) >= T: no real token overflows); for threshold only with
    threshold_max < 1 (AdaMoLE's tau = tau_max sigmoid(.) < 1 = p, so weight (p - tau)/(p - tau) = 1;
    with tau_max = 1 a saturated sigmoid gives tau = 1 and the token no expert). Or the router reads
    no token: task_routing='task' (MOELoRA) mixes the experts by the task's embedding alone, one
    mixture per task (merge one task). Shared experts add weight 1 each. Padding tokens, which switch
    never routes, are the one exception: their outputs are unused.
  * `linear` experts (MoELinear, y = W x + sum_i g_i s B_i A_i x): any fixed mixture is one delta,
    W' = W + sum_i g_i s B_i A_i.
  * `ffn` experts (MoEFFN, MixLoRA: FFN(x) + sum_i g_i (FFN_i(x) - FFN(x))): the activation between the
    projections makes a sum of FFNs no single FFN, so the merge needs exactly one expert that changes
    the FFN (some B nonzero), of weight 1: the output is then FFN_i(x), its LoRA merged on every
    projection. Experts on the output projection alone are the exception: FFN_i(x) - FFN(x) =
    s B_i A_i h(x) with the base hidden h, so any fixed mixture merges there. Experts whose B are all
    zero (untrained shared experts, fresh task blocks) add nothing and are skipped.
  * attention LoRA (`attn_r`) merges like peft's; `modules_to_save` modules are replaced by their
    trained copies.

Everything is decided before a weight changes: a refusal (`MergeError`, naming the layer and why)
leaves the model as it was. The result is the plain transformers model (every moetune wrapper
removed), usable and savable with `save_pretrained`; its parameters keep their requires_grad flags.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moetune.core.architectures import is_quantized
from moetune.core.experts import ExpertMath
from moetune.core.layers import (
    Blocks,
    LoRALinear,
    MoEFFN,
    MoELinear,
    RoutedLayer,
    TrainableCopy,
    adapter_modules,
)


class MergeError(ValueError):
    """The adapter cannot be merged into the base weights: the message names the layer and why."""


# ---- the mixture each layer applies, when it does not depend on the token ---------------------------
def fixed_router_weights(layer: RoutedLayer, blocks: Blocks, task: int | None = None) -> Tensor:
    """(E,) the weight the router gives each routed expert of `blocks` (router order), the same on
    every real token; raises MergeError (naming the layer and why) when the weights depend on the token.
    `task`: the task index the tokens route for (`use_tasks` with one task), None if none is set.

    That needs E = 1 (see the module docstring for each router), or a router whose input does not
    depend on the token: MOELoRA's task_routing='task' routes every token of `task` by the task's
    embedding alone, so its weights are computed here once, from that embedding (any E; switch only
    with E = 1, since its capacity drops tokens by their position).
    """
    router, name = layer.router, layer.layer_name
    ranges = router.block_ranges(blocks)
    E = sum(n for _, n in ranges)
    one_E = torch.ones(1, dtype=torch.float32)
    if E > 1 and router.task_routing == "task" and router.kind != "switch":
        if task is None:
            raise MergeError(
                f"{name}: task_routing='task' mixes the experts by task: name the task to merge "
                "(merge_and_unload(task=...) or use_tasks with one task)"
            )
        with torch.no_grad():  # one "token": the router's input is the task's embedding alone
            e_1D = router.task_embedding(task)[None]
            real_1 = torch.ones(1, dtype=torch.bool, device=e_1D.device)
            routing = router(e_1D, real_1, use_bias=layer.use_bias, blocks=blocks, task=task)
        return routing.dense_weights()[0].float().cpu()
    if E > 1:
        raise MergeError(
            f"{name}: the router ({router.kind!r}) chooses among {E} routed experts per token, so the "
            "mixture depends on the token; merging needs one routed expert per layer (num_experts=1, or "
            "use_tasks([...]) / task= naming a task that owns one expert)"
        )
    if router.weights_sum_to_one:
        return one_E
    if router.kind == "switch":
        if router.capacity_factor >= 1:
            return one_E  # capacity ceil(cf T / 1) >= T: every real token keeps its expert, weight p = 1
        raise MergeError(
            f"{name}: switch routing with capacity_factor={router.capacity_factor} < 1 sends the tokens "
            "beyond its capacity to no expert, which tokens depends on the batch; set capacity_factor >= 1"
        )
    if router.kind == "threshold":
        tau_max = router.threshold_max if router.threshold_max is not None else 1.0  # 1/E with E = 1
        bias = float(router.expert_bias[ranges[0][0]]) if layer.use_bias else 0.0
        if tau_max < 1.0 and 1.0 + bias >= tau_max:
            return one_E  # p = 1 >= tau always selects it; (p - tau) / (p - tau) = 1 since tau < 1
        raise MergeError(
            f"{name}: threshold routing with tau_max={tau_max} drops a token whose threshold "
            "tau_max * sigmoid(.) reaches the expert's probability 1 (a saturated sigmoid), so the "
            "mixture can depend on the token; set threshold_max < 1"
        )
    raise MergeError(f"{name}: router {router.kind!r}: no rule says when its mixture is token-independent")


def fixed_mixture(layer: RoutedLayer, blocks: Blocks, task: int | None = None) -> Tensor:
    """(N,) weight of each expert of `layer.banks(blocks)` on every token: the routed experts of
    `blocks` (`fixed_router_weights`), then the shared experts (always on, weight 1)."""
    return torch.cat([fixed_router_weights(layer, blocks, task), torch.ones(layer.num_shared)])


# ---- LoRA deltas and merging one into a weight ------------------------------------------------------
def lora_delta(bank: ExpertMath, weights_N: Tensor) -> Tensor:
    """sum_e w_e s B_e A_e  -> (d_out, d_in), in the experts' dtype."""
    A_MD = bank.flat_A()  # (N r, d_in), row e r + i = A_e[i]
    Bt_MF = bank.flat_B()  # (N r, d_out), row e r + i = B_e[:, i]
    gate_M = (weights_N.to(A_MD.dtype) * bank.scaling).repeat_interleave(bank.r)
    return (Bt_MF * gate_M[:, None]).T @ A_MD


def merge_delta(module: nn.Module, delta_FD: Tensor) -> None:
    """W += delta in place, computed in float32 or better: an nn.Linear holds W as (d_out, d_in),
    transformers' Conv1D (GPT-2) as (d_in, d_out)."""
    weight = module.weight
    delta = delta_FD if isinstance(module, nn.Linear) else delta_FD.T
    work = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        weight.copy_((weight.to(work) + delta.to(device=weight.device, dtype=work)).to(weight.dtype))


def _experts_changing(bank: ExpertMath) -> Tensor:
    """(N,) bool: the expert's B has a nonzero entry (an all-zero B adds nothing)."""
    N = bank.num_experts
    return bank.flat_B().reshape(N, -1).ne(0).any(1)


@dataclass
class _Merge:
    """One delta to add: sum_e weights_e s B_e A_e of `bank` into `target`'s weight."""

    target: nn.Module
    bank: ExpertMath
    weights: Tensor  # (N,)


def _ffn_merges(layer: MoEFFN, blocks: Blocks, task: int | None) -> list[_Merge]:
    g_N = fixed_mixture(layer, blocks, task)
    banks = layer.banks(blocks)
    out = layer.spec.out_proj
    in_projs = [p for p in layer.spec.in_projs if p in banks]
    live = g_N != 0
    live_in = torch.zeros_like(live)
    for p in in_projs:
        live_in |= live & _experts_changing(banks[p])
    if not live_in.any():
        # FFN_i(x) - FFN(x) = s B_i A_i h(x) on the output projection alone: linear in the experts
        return [_Merge(layer._proj(out), banks[out], g_N)] if out in banks else []
    changing = live_in
    for bank in banks.values():
        changing |= live & _experts_changing(bank)
    chosen = changing.nonzero().squeeze(1).tolist()
    if len(chosen) == 1 and float(g_N[chosen[0]]) == 1.0:
        onehot_N = torch.zeros_like(g_N)
        onehot_N[chosen[0]] = 1.0
        return [_Merge(layer._proj(p), bank, onehot_N) for p, bank in banks.items()]
    weights = [round(float(g_N[e]), 4) for e in chosen]
    raise MergeError(
        f"{layer.layer_name}: expert_type='ffn' mixes {len(chosen)} experts that change the FFN (weights "
        f"{weights}, routed then shared): FFN(x) + sum_i g_i (FFN_i(x) - FFN(x)) with the activation between "
        f"the projections {in_projs} and {out!r} is no single FFN; merging needs one expert of weight 1 "
        "(num_shared_experts=0 or untrained shared experts), or experts on the output projection alone"
    )


def _layer_merges(name: str, module: nn.Module, blocks: Blocks, task: int | None) -> list[_Merge]:
    if isinstance(module, MoEFFN):
        return _ffn_merges(module, blocks, task)
    if isinstance(module, MoELinear):
        return [_Merge(module.base_layer, module.banks(blocks), fixed_mixture(module, blocks, task))]
    if isinstance(module, LoRALinear):
        return [_Merge(module.base_layer, module.lora, torch.ones(1))]
    if isinstance(module, TrainableCopy):
        return []
    raise MergeError(f"{name}: {type(module).__name__} is no moetune module this merge knows")


def _check_merge(name: str, m: _Merge) -> None:
    weight = getattr(m.target, "weight", None)
    d = (m.bank.d_out, m.bank.d_in) if isinstance(m.target, nn.Linear) else (m.bank.d_in, m.bank.d_out)
    if not isinstance(weight, Tensor) or is_quantized(weight) or tuple(weight.shape) != d:
        kind = type(m.target).__name__
        shown = None if weight is None else (type(weight).__name__, weight.dtype, tuple(weight.shape))
        raise MergeError(
            f"{name}: cannot merge into {kind} with weight {shown}: needs an unquantized floating-point "
            f"nn.Linear or Conv1D weight of shape {d} (a quantized base: load the base unquantized and the "
            "adapter onto it with MoEModel.from_pretrained, then merge)"
        )
    if not (m.bank.flat_A().isfinite().all() and m.bank.flat_B().isfinite().all()):
        raise MergeError(f"{name}: its LoRA weights hold NaN/inf; nothing was merged")


def merge_into_base(base: nn.Module, blocks: Blocks, task: int | None) -> nn.Module:
    """Merge every adapter module of `base` into its base weights and return `base` without them.

    `blocks`, `task`: the routing to merge, as `MoEModel.use_tasks` sets it (the expert blocks every
    token is restricted to, None for all; the one task's index, or None). Raises MergeError, the model
    unchanged, where a layer's mixture depends on the token (see the module docstring).
    """
    wrappers = list(adapter_modules(base))
    with torch.no_grad():
        merges = [(n, m) for n, w in wrappers for m in _layer_merges(n, w, blocks, task)]  # may refuse
        for n, m in merges:
            _check_merge(n, m)
        for n, m in merges:  # nothing refused: change the weights
            merge_delta(m.target, lora_delta(m.bank, m.weights))
            if not m.target.weight.isfinite().all():
                raise MergeError(f"{n}: the merged weight overflowed to inf/NaN (earlier layers: merged)")
    replaced = {id(p) for _, w in wrappers if isinstance(w, TrainableCopy) for p in w.original.parameters()}
    for n, wrapper in reversed(wrappers):  # innermost first
        parent_name, _, child = n.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, child, wrapper.trained if isinstance(wrapper, TrainableCopy) else wrapper.base_layer)
    if replaced & {id(p) for p in base.parameters()}:
        _untie_word_embeddings(base)
    return base


def _untie_word_embeddings(base: nn.Module) -> None:
    """A trained copy replaced one of two tied modules (e.g. GPT-2's lm_head, tied to the input
    embedding): the weights differ now, so the config must no longer ask transformers to tie them."""
    config = getattr(base, "config", None)
    for c in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)())}.values():
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
