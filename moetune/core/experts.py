"""LoRA experts as stacked tensors: A (E, r, d_in), B (E, d_out, r), one block per task.

Shape suffixes (torchtitan's convention: `x_TD` is a (T, D) tensor), one meaning each, in every module
of moetune:
  B  sequences of a batch                     L  positions of a sequence
  T  tokens of a layer's input (B L flattened, or any subset of token rows)
  D  input features of a projection (the hidden size at an FFN's input and output)
  F  output features of a projection (an FFN's intermediate size at its input projections)
  E  routed experts of a router                N  experts a computation covers (a view: <= E, + shared)
  K  slots per token (top-k)                   r  LoRA rank (lower case: a size, never a set of rows)
  M  stacked rank columns, N r                 S  slots sorted by expert (the T K slots, in expert order)
  P  tokens sampled for the contrastive loss   R  routers of a model
  V  vocabulary                                W  positions scored by an evaluation
  X  entries of a small list (losses, pieces), where a name says what they are
A trailing 1 is a broadcast dimension (`gate_TN1`). Rows of no fixed kind (the n tokens one expert
receives) are named by what they hold (`rows`, `gate_rows`).

Expert e computes the delta  s * B_e A_e x  (s = lora_alpha / r, Hu et al. 2021); asymmetric experts
(HydraLoRA, Tian et al. 2024) share one A per block, A_e = A, and differ in their B_e. `add_block`
appends experts for a new task as new tensors, so freezing the old ones is per tensor. `view` picks
ranges of the stored experts (the experts a task may use) without copying a weight; the computations
below (`ExpertMath`) run the same on a view as on the whole bank, so a task's experts computed from
their own block see the same shapes, hence the same numerics, as before any block was added.

The fast paths are "dense in rank space": every expert's x A_e^T comes out of one GEMM with the
stacked A (N r, d_in), is masked per token and slot in the r-dimension (the LoRA scaling and the
routing weights folded into that (K, T, N) mask), and one GEMM with the stacked B (N r, d_out) returns
to d_out. No host sync, no per-expert loop, static shapes:
  dense         sum_e w_te * delta_e(x_t)                for `linear` experts          -> (T, d_out)
  add_per_slot  base_t + delta_{idx_tk}(x_t)              input projections of `ffn`    -> (K, T, d_out)
  reduce_slots  sum_k w_tk * delta_{idx_tk}(h_tk)         output projection of `ffn`    -> (T, d_out)
Its waste grows with E: every token multiplies by all N r columns. `GroupedSlots` sorts the T K slots
by expert once (`SlotGroups`) and runs one grouped GEMM per projection instead (work independent of E).
`SortedSlots` also sorts them, but keeps the slots in expert order through the whole FFN and runs one
plain GEMM per expert over its contiguous rows: no wasted work and no grouped kernel, for a host sync
(the group sizes) and a Python loop over the experts; it is the CPU inference path, run in pieces of
whole experts (`SortedSlots.pieces`) so that its slot tensors stay small.
`DenseSlots` / `GroupedSlots` / `SortedSlots` are the ways an `ffn` layer gets its per-slot tensors.
Custom autograd nodes keep the (K, T, F) slot tensors few in training: `WeightedSlotSum` (the mix),
and `MixAndProjectA` (the mix and the output projection's h A^T on the dense path, whose backward
writes the hidden's gradient into memory it saved).
`expert` is the slow, obvious per-expert path the tests hold the fast ones to.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moetune.core.kernels import backward_frees_graph


class ExpertMath:
    """The expert computations over a sequence of (A (n, r, d_in), B (n, d_out, r)) blocks, numbered
    in order. Shared by `LoRAExperts` (all its stored blocks) and `ExpertView` (some ranges of them)."""

    d_in: int
    d_out: int
    r: int
    scaling: float

    def _pairs(self) -> list[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    @property
    def num_experts(self) -> int:
        return sum(A.shape[0] for A, _ in self._pairs())

    @property
    def dtype(self) -> torch.dtype:
        return self._pairs()[0][0].dtype

    def compute_dtype(self, device_type: str) -> torch.dtype:
        """The dtype of the experts' matrix products on `device_type`: autocast's where it is on there
        (it casts float32 and 16-bit operands, not float64), else the weights' own."""
        if self.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.dtype

    # ---- fast paths ------------------------------------------------------------------------------
    def dense(self, x_TD: Tensor, w_TE: Tensor) -> Tensor:
        """sum_e w_te * s * B_e A_e x_t  -> (T, d_out)."""
        T, N = w_TE.shape
        xA_TNr = (x_TD.to(self.dtype) @ self.flat_A().T).view(T, N, self.r)
        gate_TN1 = (w_TE.to(self.dtype) * self.scaling)[..., None]  # scaling on (T, N), not on (T, d_out)
        return (xA_TNr * gate_TN1).view(T, N * self.r) @ self.flat_B()

    def flat_A(self) -> Tensor:
        """Every expert's A stacked by rows: (N r, d_in), row j r + i = A_j[i]."""
        As = [A.reshape(-1, self.d_in) for A, _ in self._pairs()]
        return As[0] if len(As) == 1 else torch.cat(As)  # one block: a view

    def flat_B(self) -> Tensor:
        """Every expert's B^T stacked by rows: (N r, d_out), row j r + i = B_j[:, i]."""
        return torch.cat([B.transpose(1, 2).reshape(-1, self.d_out) for _, B in self._pairs()])

    def slot_mask(self, idx_TK: Tensor, w_TK: Tensor | None = None) -> Tensor:
        """(K, T, N) in the expert dtype: s (x w_tk) where slot k of token t uses expert j, else 0."""
        experts = torch.arange(self.num_experts, device=idx_TK.device)
        mask_KTN = (idx_TK.T[..., None] == experts).to(self.dtype) * self.scaling
        return mask_KTN if w_TK is None else mask_KTN * w_TK.T[..., None].to(self.dtype)

    def add_per_slot(self, base_TF: Tensor, xA_TM: Tensor, mask_KTN: Tensor) -> Tensor:
        """base_t + s B_{idx_tk} A_{idx_tk} x_t for every slot  -> (K, T, d_out).

        `xA_TM` = x @ flat_A().T (T, N r), computed by the caller (one GEMM for several projections);
        `mask_KTN` = slot_mask(idx). The base output is added inside the batched GEMM.
        """
        K, T, N = mask_KTN.shape
        z_KTM = (xA_TM.view(1, T, N, self.r) * mask_KTN[..., None]).view(K, T, N * self.r)
        B_KMF = self.flat_B().expand(K, -1, -1)
        if base_TF.dtype == self.compute_dtype(base_TF.device.type):  # (autocast casts z and B)
            return torch.baddbmm(base_TF.unsqueeze(0), z_KTM, B_KMF)
        return base_TF.unsqueeze(0) + torch.bmm(z_KTM, B_KMF).to(base_TF.dtype)

    def reduce_slots(self, h_KTD: Tensor, gate_KTN: Tensor) -> Tensor:
        """sum_k w_tk s B_{idx_tk} A_{idx_tk} h_tk  -> (T, d_out); `gate_KTN` = slot_mask(idx, w)."""
        h_KTD = h_KTD.to(self.compute_dtype(h_KTD.device.type))
        return self.reduce_slots_xA(h_KTD @ self.flat_A().T, gate_KTN)

    def reduce_slots_xA(self, hA_KTM: Tensor, gate_KTN: Tensor) -> Tensor:
        """`reduce_slots` from h flat_A()^T  (K, T, N r)."""
        K, T, N = gate_KTN.shape
        z_TM = (hA_KTM.view(K, T, N, self.r) * gate_KTN[..., None]).sum(0).view(T, N * self.r)
        return z_TM @ self.flat_B()

    # ---- grouped path: slots sorted by expert, one grouped GEMM per projection ---------------------
    def A_T(self) -> Tensor:
        """(N, d_in, r), contiguous (the grouped GEMM wants it)."""
        return torch.cat([A.transpose(1, 2) for A, _ in self._pairs()]).contiguous()

    def B_T(self) -> Tensor:
        """(N, r, d_out), contiguous."""
        return torch.cat([B.transpose(1, 2) for _, B in self._pairs()]).contiguous()

    # ---- one expert -------------------------------------------------------------------------------
    def all_expert_weights(self) -> list[tuple[Tensor, Tensor]]:
        """Every expert's (A (r, d_in), B (d_out, r)) in order, views of the stored blocks."""
        return [pair for A, B in self._pairs() for pair in zip(A.unbind(), B.unbind(), strict=True)]

    def expert_weights(self, e: int) -> tuple[Tensor, Tensor]:
        """Expert e's (A (r, d_in), B (d_out, r)), views of the stored blocks."""
        start = 0
        for A, B in self._pairs():
            if start <= e < start + A.shape[0]:
                return A[e - start], B[e - start]
            start += A.shape[0]
        raise IndexError(f"expert {e} out of range 0..{self.num_experts - 1}")

    def expert(self, e: int, x_TD: Tensor) -> Tensor:
        """One expert's delta s * B_e A_e x, the obvious way (the reference path)  -> (N, d_out)."""
        A, B = self.expert_weights(e)
        return ((x_TD.to(self.dtype) @ A.T) * self.scaling) @ B.T  # scale the (T, r) side


class LoRAExperts(ExpertMath, nn.Module):
    """The stored experts of one projection: `lora_A` / `lora_B` hold one block per task."""

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        d_out: int,
        r: int,
        scaling: float,
        *,
        shared_A: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.d_in, self.d_out, self.r, self.scaling = d_in, d_out, r, scaling
        self.shared_A = shared_A  # asymmetric experts (HydraLoRA): one A (1, r, d_in) per block
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.add_block(num_experts, dtype=dtype, device=device)

    def add_block(
        self, n: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        """Append n experts: A Kaiming-uniform (as nn.Linear and peft: bound 1/sqrt(d_in)), B = 0.
        A is drawn on the CPU, as peft does, then moved: one seed gives one adapter on every device.
        With `shared_A` the block stores one A, which its n experts share."""
        if len(self.lora_A):
            dtype, device = dtype or self.lora_A[0].dtype, device or self.lora_A[0].device
        bound = 1.0 / math.sqrt(self.d_in)
        n_A = 1 if self.shared_A else n
        A = torch.empty(n_A, self.r, self.d_in, dtype=dtype).uniform_(-bound, bound).to(device=device)
        self.lora_A.append(nn.Parameter(A))
        self.lora_B.append(nn.Parameter(torch.zeros(n, self.d_out, self.r, dtype=dtype, device=device)))

    def _pairs(self) -> list[tuple[Tensor, Tensor]]:
        # read through the lists' own parameter dicts: iterating an nn.ParameterList converts every index
        # to a string key, about 20 us a call, and the fast paths ask tens of times per layer and forward.
        # Item access (not .values()) keeps DeepSpeed ZeRO-3's gathering dict in the loop.
        params_A, params_B = self.lora_A._parameters, self.lora_B._parameters
        if self.shared_A:  # every expert of a block reads the block's one A (a view, no copy)
            return [(params_A[key].expand(params_B[key].shape[0], -1, -1), params_B[key]) for key in params_A]
        return [(params_A[key], params_B[key]) for key in params_A]

    def extra_repr(self) -> str:
        sizes = [B.shape[0] for B in self.lora_B]
        shared = ", shared_A=True" if self.shared_A else ""
        dims = f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scaling={self.scaling:g}"
        return f"experts={sizes}, {dims}{shared}"

    def view(self, pieces: list[tuple[int, int, int]]) -> ExpertMath:
        """The experts of the ranges (block, start, stop), numbered in that order (no copy of a weight;
        a single whole block, or all blocks whole and in order, is this module itself)."""
        blocks = self._pairs()
        whole = [(b, 0, B.shape[0]) for b, (_, B) in enumerate(blocks)]
        if pieces == whole:
            return self
        pairs = []
        for b, start, stop in pieces:
            A, B = blocks[b]
            pairs.append((A, B) if (start, stop) == (0, B.shape[0]) else (A[start:stop], B[start:stop]))
        return ExpertView(pairs, self.d_in, self.d_out, self.r, self.scaling)


class ExpertView(ExpertMath):
    """Some experts of a `LoRAExperts`, renumbered from 0 (what the tokens of a task may use)."""

    def __init__(self, pairs: list[tuple[Tensor, Tensor]], d_in: int, d_out: int, r: int, scaling: float):
        self.pairs, self.d_in, self.d_out, self.r, self.scaling = pairs, d_in, d_out, r, scaling

    def _pairs(self) -> list[tuple[Tensor, Tensor]]:
        return self.pairs


@dataclass(frozen=True)
class SlotGroups:
    """The T*K routing slots (slot id k*T + t, K-major) sorted by expert, for grouped GEMMs."""

    order: Tensor  # (S,) slot ids in expert order
    token: Tensor  # (S,) token of each sorted slot
    inverse: Tensor  # (S,) position of each slot id in `order`
    offsets: Tensor  # (N,) int32, end row of each expert's group

    @classmethod
    def build(cls, idx_TK: Tensor, num_experts: int) -> SlotGroups:
        T = idx_TK.shape[0]
        expert_S = idx_TK.T.reshape(-1)
        order = torch.argsort(expert_S, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        offsets = torch.bincount(expert_S, minlength=num_experts).cumsum(0).to(torch.int32)
        return cls(order, order % T, inverse, offsets)

    def sorted(self, t_TK: Tensor) -> Tensor:
        """A per-slot tensor (T, K) in expert order  -> (S,)."""
        return t_TK.T.reshape(-1)[self.order]


def grouped_mm(x_SD: Tensor, w_NDF: Tensor, groups: SlotGroups) -> Tensor:
    """Rows of group j times w_NDF[j]  -> (S, F)."""
    return torch._grouped_mm(x_SD.contiguous(), w_NDF, offs=groups.offsets)


def has_grouped_mm(dtype: torch.dtype, *dims: int) -> bool:
    """torch >= 2.8 has a (private) grouped GEMM for float32 / bfloat16 / float16 whose matrix rows
    must be multiples of 16 bytes long."""
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    return all(d * itemsize % 16 == 0 for d in dims)


class Slots:
    """What every slot layout offers the `ffn` layer beyond its own methods."""

    def broadcast(self, t_TF: Tensor) -> Tensor:
        raise NotImplementedError

    def add_delta(self, name: str, bank: ExpertMath, base_TF: Tensor) -> Tensor:
        raise NotImplementedError

    def out_delta(self, bank: ExpertMath, h: Tensor) -> Tensor:
        raise NotImplementedError

    def mix(self, h: Tensor, init_TF: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def mix_and_out_delta(
        self, h: Tensor, init_TF: Tensor | None, bank: ExpertMath, mask_TF: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(`mix` of h, `out_delta` of h times the LoRA dropout mask (one row per token))."""
        h_dropped = h if mask_TF is None else h * self.broadcast(mask_TF)
        delta = self.out_delta(bank, h_dropped)  # first: without autograd `mix` may scale h in place
        return self.mix(h, init_TF), delta


class SlotsKT(Slots):
    """Slot tensors laid out (K, T, F): slot k of token t at [k, t] (`DenseSlots`, `GroupedSlots`)."""

    w_TK: Tensor

    def broadcast(self, t_TF: Tensor) -> Tensor:
        """A per-token tensor as a slot tensor (every slot of token t gets row t)  -> (K, T, F)."""
        return t_TF.unsqueeze(0).expand(self.w_TK.shape[1], *t_TF.shape)

    def add_out(self, y_TD: Tensor, delta_TD: Tensor) -> Tensor:
        """y + the output projection's delta (`out_delta`, already summed over the slots)."""
        return y_TD + delta_TD.to(y_TD.dtype)

    def mix(self, h_KTF: Tensor, init_TF: Tensor | None = None) -> Tensor:
        """init + sum_k w_tk h_tk  -> (T, F); `init_TF`, a fresh tensor, is updated in place."""
        return WeightedSlotSum.apply(h_KTF, self.w_TK.T.to(h_KTF.dtype), init_TF)


class WeightedSlotSum(torch.autograd.Function):
    """init + sum_k w_kt h_kt  -> (T, F), with a backward that writes one (K, T, F) gradient.

    Autograd of the loop over k would give each slot's select `h_KTF[k]` its own zero-padded (K, T, F)
    gradient and add them up: four (K, T, F) tensors where one is needed (timings in benchmarks/README.md).
    With or without autograd the sum runs in the same order, so the results are the same bits.
    """

    @staticmethod
    def forward(ctx, h_KTF: Tensor, w_KT: Tensor, init_TF: Tensor | None) -> Tensor:
        ctx.save_for_backward(h_KTF, w_KT)
        if init_TF is not None:
            ctx.mark_dirty(init_TF)
        return _weighted_slot_sum(h_KTF, w_KT, init_TF)

    @staticmethod
    def backward(ctx, grad_TF: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        h_KTF, w_KT = ctx.saved_tensors
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = grad_TF.unsqueeze(0) * w_KT[..., None]  # (K, T, F)
        if ctx.needs_input_grad[1]:
            grad_w = _slot_weight_grad(h_KTF, grad_TF)
        return grad_h, grad_w, grad_TF if ctx.needs_input_grad[2] else None


def _weighted_slot_sum(h_KTF: Tensor, w_KT: Tensor, init_TF: Tensor | None) -> Tensor:
    """init + sum_k w_kt h_kt, k in order, into `init_TF` when given."""
    if init_TF is None:
        mixed_TF, first = h_KTF[0] * w_KT[0, :, None], 1
    else:
        mixed_TF, first = init_TF, 0
    for k in range(first, h_KTF.shape[0]):
        mixed_TF.addcmul_(h_KTF[k], w_KT[k, :, None])
    return mixed_TF


def _slot_weight_grad(h_KTF: Tensor, grad_TF: Tensor) -> Tensor:
    """<h_kt, grad_t> for every (k, t)  -> (K, T): T batched (K, F) @ (F, 1) products, no (K, T, F)
    temporary."""
    return torch.bmm(h_KTF.transpose(0, 1), grad_TF.unsqueeze(-1)).squeeze(-1).T


class MixAndProjectA(torch.autograd.Function):
    """(init + sum_k w_kt h_kt, (h ⊙ mask) A^T): the mix of the slots' hidden and the output
    projection's first LoRA GEMM (on the hidden times the LoRA dropout mask) in one node.

    As separate ops autograd writes three (K, T, F) gradients for h (the mix's, the GEMM's and the
    mask multiply's) and adds them. Here the GEMM's gradient is written into the saved h ⊙ mask, which a
    backward that frees the graph (no retain_graph) no longer needs after A's gradient, and the mask and
    the mix's gradient are applied to it in place: no fresh (K, T, F) tensor in backward. Under
    retain_graph the saved tensor stays intact; under create_graph h ⊙ mask is recomputed from h, so
    its gradient reaches h. Forward values are the same ops as `WeightedSlotSum` and `reduce_slots`.
    """

    @staticmethod
    def forward(
        ctx, h_KTF: Tensor, w_KT: Tensor, init_TF: Tensor | None, mask_TF: Tensor | None, A_MF: Tensor
    ) -> tuple[Tensor, Tensor]:
        K, T, F = h_KTF.shape
        hd_KTF = h_KTF if mask_TF is None else h_KTF * mask_TF
        hA_KTM = (hd_KTF.reshape(K * T, F) @ A_MF.T).view(K, T, -1)
        ctx.save_for_backward(h_KTF, w_KT, mask_TF, A_MF, None if mask_TF is None else hd_KTF)
        if init_TF is not None:
            ctx.mark_dirty(init_TF)
        return _weighted_slot_sum(h_KTF, w_KT, init_TF), hA_KTM

    @staticmethod
    def backward(ctx, grad_TF: Tensor | None, grad_KTM: Tensor | None) -> tuple[Tensor | None, ...]:
        h_KTF, w_KT, mask_TF, A_MF, hd_KTF = ctx.saved_tensors
        K, T, F = h_KTF.shape
        grad_h = grad_w = grad_A = None
        if hd_KTF is None or torch.is_grad_enabled():  # no mask, or create_graph: h ⊙ mask from h
            hd_KTF = h_KTF if mask_TF is None else h_KTF * mask_TF
        if grad_KTM is not None:
            grad_TM = grad_KTM.reshape(K * T, -1)
            if ctx.needs_input_grad[4]:
                grad_A = grad_TM.T @ hd_KTF.reshape(K * T, F)
            if ctx.needs_input_grad[0]:
                reuse = mask_TF is not None and hd_KTF.is_contiguous() and backward_frees_graph()
                out = hd_KTF.view(K * T, F) if reuse else None
                grad_h = torch.mm(grad_TM, A_MF, out=out).view(K, T, F)
                if mask_TF is not None:
                    grad_h = grad_h.mul_(mask_TF)
        if grad_TF is not None:
            if ctx.needs_input_grad[0]:
                w_KT1 = w_KT[..., None]
                mixed_grad = grad_TF.unsqueeze(0)
                grad_h = mixed_grad * w_KT1 if grad_h is None else grad_h.addcmul_(mixed_grad, w_KT1)
            if ctx.needs_input_grad[1]:
                grad_w = _slot_weight_grad(h_KTF, grad_TF)
        grad_init = grad_TF if ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_init, None, grad_A


class DenseSlots(SlotsKT):
    """`ffn` slots dense in rank space: one GEMM gives x A for every expert of every input projection."""

    def __init__(self, in_banks: dict[str, LoRAExperts], xd_TD: Tensor, idx_TK: Tensor, w_TK: Tensor) -> None:
        self.idx_TK, self.w_TK = idx_TK, w_TK
        if in_banks:
            banks = list(in_banks.values())
            self.mask_KTN = banks[0].slot_mask(idx_TK)
            xA_TM = xd_TD.to(banks[0].dtype) @ torch.cat([b.flat_A() for b in banks]).T
            self.xA = dict(zip(in_banks, xA_TM.split([b.num_experts * b.r for b in banks], 1), strict=True))

    def add_delta(self, name: str, bank: LoRAExperts, base_TF: Tensor) -> Tensor:
        """base_t + delta_{idx_tk}(x_t) on input projection `name`  -> (K, T, F)."""
        return bank.add_per_slot(base_TF, self.xA[name], self.mask_KTN)

    def out_delta(self, bank: LoRAExperts, h_KTF: Tensor) -> Tensor:
        """sum_k w_tk delta_{idx_tk}(h_tk) on the output projection  -> (T, D)."""
        return bank.reduce_slots(h_KTF, bank.slot_mask(self.idx_TK, self.w_TK))

    def mix_and_out_delta(
        self, h_KTF: Tensor, init_TF: Tensor | None, bank: ExpertMath, mask_TF: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """As `Slots.mix_and_out_delta`, the mix and h A^T in one node (`MixAndProjectA`)."""
        dtype = bank.compute_dtype(h_KTF.device.type)
        if h_KTF.dtype != dtype or (mask_TF is not None and mask_TF.dtype != dtype):
            return super().mix_and_out_delta(h_KTF, init_TF, bank, mask_TF)
        w_KT = self.w_TK.T.to(dtype)
        # A in the compute dtype: the node's backward runs its GEMMs outside autocast
        mixed_TF, hA_KTM = MixAndProjectA.apply(h_KTF, w_KT, init_TF, mask_TF, bank.flat_A().to(dtype))
        return mixed_TF, bank.reduce_slots_xA(hA_KTM, bank.slot_mask(self.idx_TK, self.w_TK))


class GroupedSlots(SlotsKT):
    """`ffn` slots sorted by expert once; one grouped GEMM per expert projection (work independent of E)."""

    def __init__(
        self, in_banks: dict[str, LoRAExperts], xd_TD: Tensor, idx_TK: Tensor, w_TK: Tensor, num_experts: int
    ) -> None:
        self.T, self.K = idx_TK.shape
        self.w_TK = w_TK
        self.groups = SlotGroups.build(idx_TK, num_experts)  # every bank of a layer has the same experts
        self.device_type = xd_TD.device.type
        if in_banks:  # x A of every input projection in one grouped GEMM: (S, sum r)
            banks = list(in_banks.values())
            dtype = self.dtype(banks[0])
            xs_SD = xd_TD.to(dtype).index_select(0, self.groups.token)
            A_NDM = torch.cat([b.A_T() for b in banks], 2).to(dtype)
            xA_SM = grouped_mm(xs_SD, A_NDM, self.groups) * banks[0].scaling
            self.xA = dict(zip(in_banks, xA_SM.split([b.r for b in banks], 1), strict=True))

    def dtype(self, bank: ExpertMath) -> torch.dtype:
        """The grouped GEMMs' dtype: the bank's compute dtype (autocast's, which does not cover the
        grouped GEMM: the casts are explicit) where its rows fit the GEMM, else the weights' own."""
        dtype = bank.compute_dtype(self.device_type)
        return dtype if has_grouped_mm(dtype, bank.r, bank.d_in, bank.d_out) else bank.dtype

    def add_delta(self, name: str, bank: LoRAExperts, base_TF: Tensor) -> Tensor:
        delta_SF = grouped_mm(self.xA[name], bank.B_T().to(self.dtype(bank)), self.groups)
        delta_KTF = delta_SF.index_select(0, self.groups.inverse).view(self.K, self.T, -1)
        # in place on the fresh gathered tensor: one (K, T, F) tensor fewer than `base + delta`, and
        # nothing kept for backward (index_add_ would keep its whole source)
        return delta_KTF.to(base_TF.dtype).add_(base_TF)

    def out_delta(self, bank: LoRAExperts, h_KTF: Tensor) -> Tensor:
        groups, dtype = self.groups, self.dtype(bank)
        h_SF = h_KTF.reshape(self.K * self.T, -1).index_select(0, groups.order).to(dtype)
        gate_S1 = (groups.sorted(self.w_TK) * bank.scaling)[:, None].to(dtype)
        hA_SM = grouped_mm(h_SF, bank.A_T().to(dtype), groups) * gate_S1
        delta_SD = grouped_mm(hA_SM, bank.B_T().to(dtype), groups)
        out_TD = torch.zeros(self.T, bank.d_out, dtype=dtype, device=h_SF.device)
        return out_TD.index_add(0, groups.token, delta_SD)


class SortedSlots(Slots):
    """`ffn` slots sorted by expert, kept in that order (slot tensors are (S, F), S = T K): expert j's
    slots are the rows `spans` gives it, so each expert projection is one plain GEMM over them.

    The frozen projections still run once per token; their outputs are gathered into slot order, the
    activation does not care about the order, and `mix` / `out_delta` add the slots back per token.
    """

    def __init__(
        self, in_banks: dict[str, ExpertMath], xd_TD: Tensor, idx_TK: Tensor, w_TK: Tensor, num_experts: int
    ) -> None:
        self.T = T = idx_TK.shape[0]
        groups = SlotGroups.build(idx_TK, num_experts)
        self.token = groups.token  # (S,) token of each sorted slot
        self.w_S1 = groups.sorted(w_TK)[:, None]
        ends = groups.offsets.tolist()  # host sync
        starts = [0, *ends[:-1]]
        self.spans = [(j, a, b) for j, (a, b) in enumerate(zip(starts, ends, strict=True)) if b > a]
        self.xA: dict[str, Tensor] = {}
        if not in_banks:
            return
        # x A of every slot's expert on every input projection: (S, r) per projection
        banks = list(in_banks.values())
        N, K, r, dtype = banks[0].num_experts, idx_TK.shape[1], banks[0].r, banks[0].dtype
        if N <= 4 * K:  # all experts in one GEMM (at most 4x the work), then a gather
            xA_TPNr = (xd_TD.to(dtype) @ torch.cat([b.flat_A() for b in banks]).T).view(T, -1, N, r)
            expert_S = groups.sorted(idx_TK)  # (S,) expert of each sorted slot
            self.xA = dict(zip(in_banks, xA_TPNr[self.token, :, expert_S].unbind(1), strict=True))
        else:  # one small GEMM per expert over its rows
            x_SD = xd_TD.to(dtype).index_select(0, self.token)
            for name, bank in in_banks.items():
                weights = bank.all_expert_weights()
                self.xA[name] = torch.cat([x_SD[a:b] @ weights[j][0].T for j, a, b in self.spans])

    def pieces(self, max_rows: int) -> list[SortedSlots]:
        """The slots in pieces of whole experts, each of at most `max_rows` rows unless one expert has
        more (it is a piece of its own): each expert's GEMMs still run once, on all of its rows."""
        groups: list[list[tuple[int, int, int]]] = [[]]
        for span in self.spans:
            if groups[-1] and span[2] - groups[-1][0][1] > max_rows:
                groups.append([])
            groups[-1].append(span)
        return [self] if len(groups) == 1 else [self._rows(spans) for spans in groups]

    def _rows(self, spans: list[tuple[int, int, int]]) -> SortedSlots:
        """The slots of `spans` (consecutive rows) as slots of their own."""
        a0, b0 = spans[0][1], spans[-1][2]
        piece = copy.copy(self)
        piece.token, piece.w_S1 = self.token[a0:b0], self.w_S1[a0:b0]
        piece.spans = [(j, a - a0, b - a0) for j, a, b in spans]
        piece.xA = {name: xA_Sr[a0:b0] for name, xA_Sr in self.xA.items()}
        return piece

    def broadcast(self, t_TF: Tensor) -> Tensor:
        """A per-token tensor in slot order  -> (S, F)."""
        return t_TF.index_select(0, self.token)

    def add_delta(self, name: str, bank: ExpertMath, base_TF: Tensor) -> Tensor:
        """base_t + delta_j(x_t) for every slot (t, j)  -> (S, F)."""
        out_SF = self.broadcast(base_TF)  # fresh: the experts add into their rows in place
        xA_Sr, weights = self.xA[name], bank.all_expert_weights()
        dtype = bank.compute_dtype(out_SF.device.type)
        for j, a, b in self.spans:
            B = weights[j][1]
            if out_SF.dtype == dtype:  # in place: autocast casts no operand, so B is cast here
                out_SF[a:b].addmm_(xA_Sr[a:b].to(dtype), B.T.to(dtype), alpha=bank.scaling)
            else:
                out_SF[a:b] += (xA_Sr[a:b] @ B.T * bank.scaling).to(out_SF.dtype)
        return out_SF

    def out_delta(self, bank: ExpertMath, h_SF: Tensor) -> Tensor:
        """w s B_j A_j h of every slot  -> (S, d_out), for `add_out`."""
        dtype, weights = bank.compute_dtype(h_SF.device.type), bank.all_expert_weights()
        h_SF = h_SF.to(dtype)
        gate_S1 = self.w_S1.to(dtype) * bank.scaling  # applied on the (n, r) side
        z = [(h_SF[a:b] @ weights[j][0].T) * gate_S1[a:b] for j, a, b in self.spans]
        if torch.is_grad_enabled():
            return torch.cat([z_n @ weights[j][1].T for z_n, (j, _, _) in zip(z, self.spans, strict=True)])
        delta_SD = h_SF.new_empty(h_SF.shape[0], bank.d_out)
        for z_n, (j, a, b) in zip(z, self.spans, strict=True):  # out=: autocast casts no operand
            torch.mm(z_n.to(dtype), weights[j][1].T.to(dtype), out=delta_SD[a:b])
        return delta_SD

    def add_out(self, y_TD: Tensor, delta_SD: Tensor) -> Tensor:
        """y_t + the deltas of the slots of token t (in place on y)  -> (T, d_out)."""
        return y_TD.index_add_(0, self.token, delta_SD.to(y_TD.dtype))

    def mix(self, h_SF: Tensor, init_TF: Tensor | None = None) -> Tensor:
        """init + sum over the slots of token t of w h  -> (T, F). Without autograd h is scaled in place
        (call `out_delta` first)."""
        w_S1 = self.w_S1.to(h_SF.dtype)
        hw_SF = h_SF.mul_(w_S1) if not torch.is_grad_enabled() else h_SF * w_S1
        mixed_TF = h_SF.new_zeros(self.T, h_SF.shape[1]) if init_TF is None else init_TF
        return mixed_TF.index_add_(0, self.token, hw_SF)
