"""Modules that wrap a frozen base module and add LoRA experts to its output.

  MoEFFN     (`expert_type="ffn"`, MixLoRA, Li et al. 2024) wraps a whole feed-forward block. Expert i is
             the FFN with W + s B_i A_i on its projections; the output is
                 FFN(x) + sum_i g_i (FFN_i(x) - FFN(x))
             which equals sum_i g_i FFN_i(x) when the g_i sum to 1 and keeps FFN(x) for a token without
             experts. The fast path runs the frozen projections once: the input projections for all
             tokens, and the output projection once on  h0 + sum_i g_i (h_i - h0)  (it is linear).
  MoELinear  (`expert_type="linear"`, LoRAMoE / MoLA) wraps one linear layer: y = W x + sum_i g_i s B_i A_i x.
  LoRALinear plain LoRA (attention projections under `attn_r`).
  TrainableCopy  a trainable copy of a module (`modules_to_save`); the original serves the disabled adapter.

All of them read the model's one `RoutingContext` (moetune.core.context), which the `MoEModel` fills
before each forward (padding mask, tasks, adapter on/off), because transformers never passes the mask
to an MLP.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from moetune.config import MoEConfig
from moetune.core import sharding
from moetune.core.architectures import FFNSpec, linear_dims
from moetune.core.checkpointing import attach_losses
from moetune.core.context import RouterRecord, RoutingContext
from moetune.core.experts import (
    DenseSlots,
    ExpertMath,
    GroupedSlots,
    LoRAExperts,
    Slots,
    SortedSlots,
    has_grouped_mm,
)
from moetune.core.routing import DTYPES, Router, Routing
from moetune.core.stats import accumulate_stats
from moetune.core.tasks import Blocks


def dropout_mask(like: Tensor, shape: tuple[int, ...], p: float, dtype: torch.dtype | None = None) -> Tensor:
    """Inverted dropout's multiplier (Srivastava et al. 2014): 0 with probability p, else 1 / (1 - p),
    in `dtype` (default `like`'s) on `like`'s device. On CPU from uniform draws (u < 1 - p), faster
    there than bernoulli_; on GPUs bernoulli_ is one fused kernel."""
    keep, dtype = 1.0 - p, dtype or like.dtype
    if like.device.type != "cpu":
        return like.new_empty(shape, dtype=dtype).bernoulli_(keep).div_(keep)
    # 16-bit uniforms are coarse (bf16 steps by 2^-8 near 1): draw in float32 for them
    draw_dtype = torch.float32 if dtype.itemsize < 4 else dtype
    u = torch.empty(shape, dtype=draw_dtype).uniform_()
    return u.lt_(keep).to(dtype).div_(keep)


class LoRADropout(nn.Dropout):
    """nn.Dropout on the LoRA input, its CPU mask from `dropout_mask` (the same distribution; torch's
    CPU dropout draws bernoulli_); elsewhere, and in eval mode, nn.Dropout itself."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return x * dropout_mask(x, tuple(x.shape), self.p)


def lora_dropout(p: float) -> nn.Module:
    return LoRADropout(p) if p > 0 else nn.Identity()


class AdapterLayer(nn.Module):
    """The one marker of every module moetune puts into a model (peft's `BaseTunerLayer`): it wraps a
    frozen base module, which `get_base_layer()` returns, and adds trainable tensors of its own."""

    def get_base_layer(self) -> nn.Module:
        return self.base_layer


def adapter_modules(root: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(name, module) of every adapter module in `root`, outermost first."""
    for name, module in root.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


class RoutedLayer(AdapterLayer):
    """Common part of the MoE layers: a router over E experts (+ always-on shared experts)."""

    def __init__(
        self,
        cfg: MoEConfig,
        d_router: int,
        num_experts: int,
        ctx: RoutingContext,
        name: str,
        device: torch.device | None,
    ) -> None:
        super().__init__()
        self.ctx, self.layer_name = ctx, name
        self.use_bias = cfg.bias_update_rate > 0
        self.num_shared = cfg.num_shared_experts
        self.router = Router(
            d_router,
            num_experts,
            kind=cfg.router,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            capacity_factor=cfg.capacity_factor,
            threshold_max=cfg.threshold_max,
            router_dtype=cfg.router_dtype,
            jitter=cfg.router_jitter,
            task_routing=cfg.task_routing,
            num_tasks=1 + len(cfg.extra_tasks),
            device=device,
        )
        self.lora_dropout = lora_dropout(cfg.lora_dropout)
        self._recomputed_losses: list[Tensor] = []  # reentrant checkpointing: to attach to the output

    # ---- tasks: one block of experts per task ----------------------------------------------------
    def expert_banks(self) -> list[LoRAExperts]:
        raise NotImplementedError

    def add_experts(self, n: int) -> None:
        """Append a task block of n routed experts: router rows, bias entries, and every projection's A, B."""
        self.router.add_block(n)
        for bank in self.expert_banks():
            bank.add_block(n)

    def pieces(self, blocks: Blocks) -> list[tuple[int, int, int]]:
        """Bank ranges (block, start, stop) of the experts tokens restricted to `blocks` use: the routed
        experts of those blocks in order (router index = position), then the shared experts. Block 0
        stores the first task's routed experts followed by the shared ones (the layout before tasks)."""
        ranges = self.router.block_ranges(blocks)
        out = [(b, 0, n) for b, (_, n) in zip(blocks or range(len(ranges)), ranges, strict=True)]
        if self.num_shared:
            E0 = self.router.weight_blocks[0].shape[0]
            if out[-1] == (0, 0, E0):
                out[-1] = (0, 0, E0 + self.num_shared)  # adjacent in storage: one range
            else:
                out.append((0, E0, E0 + self.num_shared))
        return out

    def _per_task_group(self, x_TD: Tensor, lead: torch.Size, run: Callable[..., Tensor]) -> Tensor:
        """run(x, mask, blocks, task) on each group of tokens routed alike (`ForwardState.task_groups`);
        the results back in token order (T, ...)."""
        ctx = self.ctx.now()
        mask_T, groups = ctx.mask_for(lead, x_TD.device), ctx.task_groups(lead, x_TD.device)
        if len(groups) == 1:
            return run(x_TD, mask_T, *groups[0][1:])
        rows_T = torch.cat([rows for rows, _, _ in groups])
        parts = torch.cat([run(x_TD[rows], mask_T[rows], blocks, task) for rows, blocks, task in groups])
        return parts.new_empty(parts.shape).index_copy(0, rows_T, parts)

    # ---- routing ---------------------------------------------------------------------------------
    def route(
        self,
        x_TD: Tensor,
        lead_shape: torch.Size,
        mask_T: Tensor | None = None,
        blocks: Blocks = None,
        banks: Any = None,
        task: int | None = None,
    ) -> tuple[Routing, Tensor]:
        """Route T tokens of task `task` among the experts of `blocks`; `banks`: their expert views
        (contrastive loss)."""
        if mask_T is None:
            mask_T = self.ctx.now().mask_for(lead_shape, x_TD.device)
        routing = self.router(x_TD, mask_T, use_bias=self.use_bias, blocks=blocks, task=task)
        recomputing = self.ctx.recomputing()  # a checkpointed forward again: count nothing twice
        if not recomputing:
            with torch.no_grad():
                count = self.training and self.use_bias
                accumulate_stats(self.router, routing, mask_T, count_step=count, blocks=blocks, task=task)
        record = RouterRecord(self.layer_name, routing, mask_T, grad_enabled=torch.is_grad_enabled())
        if self.ctx.now().want_expert_outputs:  # also when recomputing: the same graph, the same RNG use
            sample = _sample_real_tokens(mask_T, self.ctx.options.contrastive_sample)
            banks = self.banks(blocks) if banks is None else banks
            record.expert_outputs = self.all_expert_deltas(x_TD[sample], banks, routing.num_experts)
            record.sample_active = routing.assignment()[sample]
        if self.ctx.records is not None:
            self.ctx.records.append(record)
        tap = self.ctx.now().aux_tap
        if tap is not None and recomputing and torch.is_grad_enabled():
            self._recomputed_losses.append(tap.loss_of(record))
        return routing, mask_T

    def _with_recomputed_losses(self, y: Tensor) -> Tensor:
        """`y` carrying the balance losses recomputed in this forward (reentrant checkpointing only)."""
        if not self._recomputed_losses:
            return y
        losses, self._recomputed_losses = self._recomputed_losses, []
        return attach_losses(y, losses, self.ctx.now().aux_tap)

    def banks(self, blocks: Blocks) -> Any:
        """The expert views of the experts tokens restricted to `blocks` use (numbered as `pieces`)."""
        raise NotImplementedError

    def all_expert_deltas(self, x_PD: Tensor, banks: Any, num_routed: int) -> Tensor:
        """Every routed expert's delta on P sampled tokens, no dropout: (P, E, D)."""
        raise NotImplementedError

    def _slots(self, routing: Routing, T: int) -> tuple[Tensor, Tensor]:
        """Routed slots followed by the always-on shared experts (weight 1): (T, K+S) each."""
        idx, w = (
            routing.indices,
            torch.where(routing.active, routing.weights, torch.zeros_like(routing.weights)),
        )
        if self.num_shared:
            E = routing.num_experts
            shared = torch.arange(E, E + self.num_shared, device=idx.device).expand(T, -1)
            idx = torch.cat([idx, shared], 1)
            w = torch.cat([w, torch.ones(T, self.num_shared, dtype=w.dtype, device=w.device)], 1)
        return idx, w


def expert_rows(idx_TK: Tensor, w_TK: Tensor, e: int) -> tuple[Tensor, Tensor]:
    """Reference path: the n tokens with a slot on expert e, and the weight each gives it: (n,), (n,)."""
    hit_TK = idx_TK == e
    rows = hit_TK.any(1).nonzero().squeeze(1)
    return rows, torch.where(hit_TK, w_TK, torch.zeros_like(w_TK)).sum(1)[rows]


def _sample_real_tokens(mask_T: Tensor, n: int) -> Tensor:
    real = mask_T.nonzero().squeeze(1)
    return real[torch.randperm(real.numel(), device=real.device)[:n]].sort().values


class MoEFFN(RoutedLayer):
    """A feed-forward block whose experts are the FFN with their own LoRA on its projections."""

    def __init__(
        self,
        base_layer: nn.Module,
        spec: FFNSpec,
        targets: list[str],
        cfg: MoEConfig,
        num_experts: int,
        ctx: RoutingContext,
        name: str,
    ) -> None:
        first = getattr(base_layer, spec.in_projs[0])
        weight = first.weight
        super().__init__(cfg, linear_dims(first)[0], num_experts, ctx, name, weight.device)
        self.base_layer, self.spec = base_layer, spec
        total = num_experts + cfg.num_shared_experts
        self.experts = nn.ModuleDict(
            {
                p: LoRAExperts(
                    total,
                    *linear_dims(getattr(base_layer, p)),
                    cfg.r,
                    cfg.scaling,
                    shared_A=cfg.asymmetric_experts,
                    dtype=_adapter_dtype(weight, cfg.adapter_dtype),
                    device=weight.device,
                )
                for p in targets
            }
        )

    def _proj(self, name: str) -> nn.Module:
        return getattr(self.base_layer, name)

    def _post(self, y: Tensor) -> Tensor:
        return self.spec.output(self.base_layer, y)

    def expert_banks(self) -> list[LoRAExperts]:
        return list(self.experts.values())

    def banks(self, blocks: Blocks) -> dict[str, ExpertMath]:
        pieces = self.pieces(blocks)
        return {p: bank.view(pieces) for p, bank in self.experts.items()}

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not self.ctx.now().adapter_enabled:
            return self.base_layer(x, *args, **kwargs)
        lead = x.shape[:-1]
        y = self._per_task_group(x.reshape(-1, x.shape[-1]), lead, self._mixture)
        return self._with_recomputed_losses(self._post(y).view(*lead, -1))

    def _mixture(self, x_TD: Tensor, mask_T: Tensor, blocks: Blocks, task: int | None) -> Tensor:
        """FFN(x) + sum_i g_i (FFN_i(x) - FFN(x)) with experts of `blocks`, before the post dropout."""
        banks = self.banks(blocks)
        routing, _ = self.route(x_TD, x_TD.shape[:-1], mask_T, blocks, banks, task)
        idx_TK, w_TK = self._slots(routing, x_TD.shape[0])
        if self.ctx.options.reference:
            return self._reference(x_TD, idx_TK, w_TK, banks)
        return self._fast_blocks(x_TD, idx_TK, w_TK, banks)

    def _fast_blocks(
        self, x_TD: Tensor, idx_TK: Tensor, w_TK: Tensor, banks: dict[str, ExpertMath]
    ) -> Tensor:
        """`_fast`, on the dense and grouped paths in blocks of `cpu_inference_block` tokens when it runs
        on CPU without autograd (the sorted path splits its slots by expert instead: `_slot_pieces`).

        The K per-slot hidden tensors (K, T, F) are K times the frozen FFN's largest activation. In
        blocks they stay small, so the allocator hands the same memory back every block instead of
        fresh pages that fault on first touch (page-fault counts in benchmarks/README.md). It also
        bounds the inference memory of long inputs. The routing is already done, so every token gets the same
        experts and weights as in one block.
        """
        T, block = x_TD.shape[0], self.ctx.options.cpu_inference_block
        split = not torch.is_grad_enabled() and x_TD.device.type == "cpu" and 0 < block < T
        # the path last: training (autograd on) does not work it out here as well as in `_fast`
        if not split or self.slot_path(banks, x_TD.device) == "sorted":
            return self._fast(x_TD, idx_TK, w_TK, banks)
        spans = [slice(s, s + block) for s in range(0, T, block)]
        return torch.cat([self._fast(x_TD[s], idx_TK[s], w_TK[s], banks) for s in spans])

    def _fast(
        self, x_TD: Tensor, idx_TK: Tensor, w_TK: Tensor, banks: dict[str, ExpertMath] | None = None
    ) -> Tensor:
        """The frozen projections run once per token; the slots (K per token) get the expert deltas."""
        banks = dict(self.experts) if banks is None else banks
        xd_TD = self.lora_dropout(x_TD)  # once per token, shared by all experts
        in_banks = {p: banks[p] for p in self.spec.in_projs if p in banks}
        out_bank = banks.get(self.spec.out_proj)
        base_outs = [self._proj(p)(x_TD) for p in self.spec.in_projs]
        # the hidden's dtype: under autocast the projections', not x's
        mask_TF = self._hidden_dropout_mask(x_TD, base_outs[0].dtype) if out_bank is not None else None
        num_experts = next(iter(banks.values())).num_experts
        path = self.slot_path(banks, x_TD.device)
        if path == "sorted":
            slots = SortedSlots(in_banks, xd_TD, idx_TK, w_TK, num_experts)
        elif path == "grouped":
            slots = GroupedSlots(in_banks, xd_TD, idx_TK, w_TK, num_experts)
        else:
            slots = DenseSlots(in_banks, xd_TD, idx_TK, w_TK)
        # h0 + sum_k w_k (h_k - h0) = (1 - sum_k w_k) h0 + sum_k w_k h_k; the h0 term is skipped where
        # the weights sum to 1 for every token (it would be rounding error times h0)
        mixed_TF = None
        if not (self.router.weights_sum_to_one and not self.num_shared):
            h0_TF = self.spec.hidden_state(self.base_layer, base_outs)
            mixed_TF = h0_TF * (1 - w_TK.sum(1, keepdim=True).to(h0_TF.dtype))
        out_deltas = []
        for piece in self._slot_pieces(slots, idx_TK.shape[1]):
            h_SF = self._slot_hidden(piece, base_outs, in_banks)
            if out_bank is None:
                mixed_TF = piece.mix(h_SF, mixed_TF)
            else:
                mixed_TF, delta = piece.mix_and_out_delta(h_SF, mixed_TF, out_bank, mask_TF)
                out_deltas.append((piece, delta))
        y_TD = self._proj(self.spec.out_proj)(mixed_TF)
        for piece, delta in out_deltas:
            y_TD = piece.add_out(y_TD, delta)
        return y_TD

    def _slot_pieces(self, slots: Slots, K: int) -> list[Slots]:
        """The slots in one piece, or, on the sorted path without autograd, in pieces of whole experts
        of about `cpu_inference_block` tokens' slots each.

        Pieces keep the (S, F) slot tensors small, as token blocks do (`_fast_blocks`), while every
        expert's GEMMs still run once per layer instead of once per block (fewer small ops).
        """
        block = self.ctx.options.cpu_inference_block
        if isinstance(slots, SortedSlots) and block > 0 and not torch.is_grad_enabled():
            return slots.pieces(block * K)
        return [slots]

    def _slot_hidden(self, slots: Slots, base_outs: list[Tensor], in_banks: dict[str, ExpertMath]) -> Tensor:
        """act of every slot's input projections, the experts' deltas added: (K, T, F) on the dense and
        grouped paths, (S, F) in expert order on the sorted path."""
        slot_outs = [
            slots.add_delta(p, in_banks[p], base_TF) if p in in_banks else slots.broadcast(base_TF)
            for p, base_TF in zip(self.spec.in_projs, base_outs, strict=True)
        ]
        # fresh slot tensors are read once: without autograd they are combined in place, with it
        # SiluGLU's backward writes its gradients over them (a broadcast base output is not fresh)
        fresh = isinstance(slots, SortedSlots) or len(in_banks) == len(self.spec.in_projs)
        return self.spec.hidden_state(self.base_layer, slot_outs, in_place=fresh)

    def slot_path(
        self, banks: dict[str, ExpertMath] | None = None, device: torch.device | None = None
    ) -> str:
        """How `_fast` computes the slots (`ComputeOptions.dispatch` forces one):
        - inference on CPU (eval mode, no autograd): "sorted", no padded slots and one GEMM per
          expert; the fastest of the three at E=64, within noise of dense at E=8 (benchmarks/README.md).
        - otherwise "grouped" (`uses_grouped`) or "dense". Also under torch.compile: the sorted path's
          group sizes are data-dependent shapes (a graph break per layer).
        """
        banks = dict(self.experts) if banks is None else banks
        if self.ctx.options.dispatch == "sorted":
            return "sorted"
        eager = not torch.compiler.is_compiling()
        inference = not self.training and not torch.is_grad_enabled()
        if self.ctx.options.dispatch == "auto" and eager and inference:
            device = device or self.router.weight_blocks[0].device
            if device.type == "cpu":
                return "sorted"
        return "grouped" if self.uses_grouped(banks) else "dense"

    def uses_grouped(self, banks: dict[str, ExpertMath] | None = None) -> bool:
        """Grouped GEMMs once the dense path's extra work, about N r (1/d_in + 1/d_out) of the base
        projection, passes one quarter; dense below (static shapes, fewer kernels). N counts the
        experts the tokens may use (`banks`, default all); the threshold comes from the training-step
        measurements in benchmarks/README.md. On CUDA, float32 adapters stay dense: torch's float32
        grouped GEMM is a loop of GEMMs."""
        banks = dict(self.experts) if banks is None else banks
        bank = next(iter(banks.values()))
        if not all(has_grouped_mm(b.dtype, b.r, b.d_in, b.d_out) for b in banks.values()):
            return False  # e.g. float64 or r = 3: the dense path
        if self.ctx.options.dispatch != "auto":
            return self.ctx.options.dispatch == "grouped"
        if bank.dtype == torch.float32 and self.router.weight_blocks[0].device.type == "cuda":
            return False
        if bank.dtype != torch.bfloat16 and torch.compiler.is_compiling():
            return False  # torch.compile traces torch._grouped_mm for bf16 alone (torch 2.13)
        return bank.num_experts * bank.r * (1 / bank.d_in + 1 / bank.d_out) > 0.25

    def _hidden_dropout_mask(self, x_TD: Tensor, dtype: torch.dtype) -> Tensor | None:
        """LoRA dropout's mask for the hidden (T, F) in training, one row per token shared by its K
        slots, drawn directly (one (T, F) tensor, not the three of nn.Dropout on ones)."""
        if not (self.training and isinstance(self.lora_dropout, nn.Dropout)):
            return None
        F = linear_dims(self._proj(self.spec.out_proj))[0]
        return dropout_mask(x_TD, (x_TD.shape[0], F), self.lora_dropout.p, dtype)

    def _expert_ffn(
        self, e: int | None, x_TD: Tensor, xd_TD: Tensor, banks: dict[str, ExpertMath] | None = None
    ) -> Tensor:
        """FFN_e(x) without the post dropout (expert e of `banks`, default all); e=None is the frozen FFN."""
        banks = dict(self.experts) if banks is None else banks
        outs = []
        for p in self.spec.in_projs:
            out = self._proj(p)(x_TD)
            if e is not None and p in banks:
                out = out + banks[p].expert(e, xd_TD).to(out.dtype)
            outs.append(out)
        h = self.spec.hidden_state(self.base_layer, outs)
        y = self._proj(self.spec.out_proj)(h)
        if e is not None and self.spec.out_proj in banks:
            y = y + banks[self.spec.out_proj].expert(e, self.lora_dropout(h)).to(y.dtype)
        return y

    def _reference(self, x_TD: Tensor, idx_TK: Tensor, w_TK: Tensor, banks: dict[str, ExpertMath]) -> Tensor:
        """FFN(x) + sum_i g_i (FFN_i(x) - FFN(x)), one expert at a time on the tokens it was given."""
        xd_TD = self.lora_dropout(x_TD)
        y0_TD = self._expert_ffn(None, x_TD, xd_TD)
        delta_TD = torch.zeros_like(y0_TD)
        for e in range(next((bank.num_experts for bank in banks.values()), 0)):
            rows, gate_rows = expert_rows(idx_TK, w_TK, e)  # (n,) each
            if rows.numel():
                y_e = self._expert_ffn(e, x_TD[rows], xd_TD[rows], banks)
                delta_TD = delta_TD.index_add(0, rows, gate_rows[:, None].to(y_e.dtype) * (y_e - y0_TD[rows]))
        return y0_TD + delta_TD

    def all_expert_deltas(self, x_PD: Tensor, banks: Any, num_routed: int) -> Tensor:
        """FFN_e(x) - FFN(x) for every routed expert e of `banks`, no dropout: (P, E, D)."""
        y0_PD = self._expert_ffn(None, x_PD, x_PD)
        deltas = [self._expert_ffn(e, x_PD, x_PD, banks) - y0_PD for e in range(num_routed)]
        return torch.stack(deltas, 1)


class WrapsLinear:
    """A wrapper of a linear layer shows the frozen layer's `weight` and `bias`, as peft's LoRA layers
    do: model code reads them (a dtype, tied weights) from what it believes is the linear layer."""

    base_layer: nn.Module

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias


class MoELinear(WrapsLinear, RoutedLayer):
    """A linear layer with E routed LoRA-delta experts: y = W x + sum_i g_i s B_i A_i x."""

    def __init__(
        self, base_layer: nn.Module, cfg: MoEConfig, num_experts: int, ctx: RoutingContext, name: str
    ) -> None:
        d_in, d_out = linear_dims(base_layer)
        super().__init__(cfg, d_in, num_experts, ctx, name, base_layer.weight.device)
        self.base_layer = base_layer
        self.experts = LoRAExperts(
            num_experts + cfg.num_shared_experts,
            d_in,
            d_out,
            cfg.r,
            cfg.scaling,
            shared_A=cfg.asymmetric_experts,
            dtype=_adapter_dtype(base_layer.weight, cfg.adapter_dtype),
            device=base_layer.weight.device,
        )

    def expert_banks(self) -> list[LoRAExperts]:
        return [self.experts]

    def banks(self, blocks: Blocks) -> ExpertMath:
        return self.experts.view(self.pieces(blocks))

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if not self.ctx.now().adapter_enabled:
            return y
        if not isinstance(y, Tensor):  # e.g. an MoE router subclassing nn.Linear (Llama 4, PhiMoE)
            kind = type(self.base_layer).__name__
            raise ValueError(
                f"{self.layer_name} ({kind}) returns {type(y).__name__}, not a tensor: it is not a linear "
                "layer experts can be added to; leave it out of target_modules"
            )
        lead = x.shape[:-1]
        delta = self._per_task_group(x.reshape(-1, x.shape[-1]), lead, self._delta)
        return self._with_recomputed_losses(y + delta.view(*lead, -1).to(y.dtype))

    def _delta(self, x_TD: Tensor, mask_T: Tensor, blocks: Blocks, task: int | None) -> Tensor:
        """sum_i g_i s B_i A_i x over the experts of `blocks`  -> (T, d_out)."""
        bank = self.banks(blocks)
        routing, _ = self.route(x_TD, x_TD.shape[:-1], mask_T, blocks, bank, task)
        idx_TK, w_TK = self._slots(routing, x_TD.shape[0])
        xd_TD = self.lora_dropout(x_TD)
        T, N = x_TD.shape[0], bank.num_experts
        if not self.ctx.options.reference:
            w_TN = torch.zeros(T, N, dtype=w_TK.dtype, device=x_TD.device)
            return bank.dense(xd_TD, w_TN.scatter_add(1, idx_TK, w_TK))
        delta = torch.zeros(T, bank.d_out, dtype=bank.dtype, device=x_TD.device)
        for e in range(N):
            rows, gate_rows = expert_rows(idx_TK, w_TK, e)  # (n,) each
            if rows.numel():
                delta = delta.index_add(
                    0, rows, gate_rows[:, None].to(delta.dtype) * bank.expert(e, xd_TD[rows])
                )
        return delta

    def all_expert_deltas(self, x_PD: Tensor, banks: Any, num_routed: int) -> Tensor:
        return torch.stack([banks.expert(e, x_PD) for e in range(num_routed)], 1)  # (P, E, d_out)


class LoRALinear(WrapsLinear, AdapterLayer):
    """Plain LoRA (Hu et al. 2021) on a frozen linear layer: y = W x + s B A dropout(x)."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        scaling: float,
        dropout: float,
        ctx: RoutingContext,
        adapter_dtype: str = "auto",
    ) -> None:
        super().__init__()
        self.base_layer, self.ctx = base_layer, ctx
        d_in, d_out = linear_dims(base_layer)
        w = base_layer.weight
        dtype = _adapter_dtype(w, adapter_dtype)
        self.lora = LoRAExperts(1, d_in, d_out, r, scaling, dtype=dtype, device=w.device)
        self.lora_dropout = lora_dropout(dropout)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if not self.ctx.now().adapter_enabled:
            return y
        x_TD = self.lora_dropout(x.reshape(-1, x.shape[-1]))
        if not torch.is_grad_enabled() and y.dtype == self.lora.dtype and y.is_contiguous():
            # inference: B's GEMM adds into the frozen output (no delta tensor, no separate add)
            A, B = self.lora.expert_weights(0)
            y.view(-1, y.shape[-1]).addmm_((x_TD.to(A.dtype) @ A.T) * self.lora.scaling, B.T)
            return y
        delta = self.lora.expert(0, x_TD)
        return y + delta.view(*y.shape[:-1], -1).to(y.dtype)


class TrainableCopy(AdapterLayer):
    """`modules_to_save`: a trainable copy of a module; the frozen original serves `disable_adapter`."""

    def __init__(self, original: nn.Module, ctx: RoutingContext) -> None:
        super().__init__()
        self.original, self.ctx = original, ctx
        with sharding.gathered(original.parameters()):  # a base partitioned by ZeRO-3's zero.Init
            self.trained = copy.deepcopy(original)
        self.trained.requires_grad_(True)

    def get_base_layer(self) -> nn.Module:
        return self.original

    def forward(self, *args, **kwargs):
        return (self.trained if self.ctx.now().adapter_enabled else self.original)(*args, **kwargs)


def _adapter_dtype(base_weight: Tensor, setting: str = "auto") -> torch.dtype:
    """The LoRA weights' dtype (`MoEConfig.adapter_dtype`). "auto": fp32 master weights over low-precision
    bases (as peft's autocast_adapter_dtype=True), the base's dtype over fp32/fp64 ones; else the named."""
    if setting != "auto":
        return DTYPES[setting]
    return base_weight.dtype if base_weight.dtype in (torch.float32, torch.float64) else torch.float32
