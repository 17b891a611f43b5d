"""LoRA experts as stacked tensors: A (E, r, d_in), B (E, d_out, r), one block per task.

Expert e computes the delta  s * B_e A_e x  (s = lora_alpha / r, Hu et al. 2021). `add_block`
appends experts for a new task as new tensors, so freezing the old ones is per tensor.

Three fast, fully batched ways to combine experts, all "dense in rank space": every expert's x A_e^T
comes out of one GEMM, is scaled (or one-hot masked) per token in the r-dimension, and one GEMM with
the stacked B returns to d_out; no host sync, no per-expert loop, static shapes:
  dense            sum_e w_te * delta_e(x_t)                for `linear` experts        -> (T, d_out)
  per_slot         delta_{idx_tk}(x_t)                       input deltas of `ffn` slots -> (T, K, d_out)
  per_slot_reduce  sum_k w_tk * delta_{idx_tk}(h_tk)          output delta of `ffn` slots -> (T, d_out)
`expert` is the slow, obvious per-expert path the tests hold the fast ones to.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LoRAExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        d_in: int,
        d_out: int,
        r: int,
        scaling: float,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.d_in, self.d_out, self.r, self.scaling = d_in, d_out, r, scaling
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.add_block(num_experts, dtype=dtype, device=device)

    def add_block(
        self, n: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        """Append n experts: A Kaiming-uniform (as nn.Linear and peft: bound 1/sqrt(d_in)), B = 0."""
        if len(self.lora_A):
            dtype, device = dtype or self.lora_A[0].dtype, device or self.lora_A[0].device
        bound = 1.0 / math.sqrt(self.d_in)
        A = torch.empty(n, self.r, self.d_in, dtype=dtype, device=device).uniform_(-bound, bound)
        self.lora_A.append(nn.Parameter(A))
        self.lora_B.append(nn.Parameter(torch.zeros(n, self.d_out, self.r, dtype=dtype, device=device)))

    @property
    def num_experts(self) -> int:
        return sum(a.shape[0] for a in self.lora_A)

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A[0].dtype

    def extra_repr(self) -> str:
        sizes = [a.shape[0] for a in self.lora_A]
        return f"experts={sizes}, d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scaling={self.scaling:g}"

    def _blocks(self):
        """(first expert index, A (n, r, d_in), B (n, d_out, r)) per block."""
        start = 0
        for A, B in zip(self.lora_A, self.lora_B, strict=True):
            yield start, A, B
            start += A.shape[0]

    @staticmethod
    def _flat(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        n, r, d_in = A.shape
        return A.reshape(n * r, d_in), B.permute(1, 0, 2).reshape(
            B.shape[1], n * r
        )  # (nr, d_in), (d_out, nr)

    # ---- fast paths ------------------------------------------------------------------------------
    def dense(self, x_TD: Tensor, w_TE: Tensor) -> Tensor:
        """sum_e w_te * s * B_e A_e x_t  -> (T, d_out)."""
        x_TD = x_TD.to(self.dtype)
        w_TE = w_TE.to(self.dtype) * self.scaling  # scaling on (T, E), not on the (T, d_out) output
        out = None
        for start, A, B in self._blocks():
            n = A.shape[0]
            A_flat, B_flat = self._flat(A, B)
            z_Tnr = (x_TD @ A_flat.T).view(-1, n, self.r) * w_TE[:, start : start + n, None]
            y = z_Tnr.reshape(-1, n * self.r) @ B_flat.T
            out = y if out is None else out + y
        return out

    def per_slot(self, x_TD: Tensor, idx_TK: Tensor) -> Tensor:
        """s * B_{idx_tk} A_{idx_tk} x_t for every slot  -> (T, K, d_out)."""
        x_TD = x_TD.to(self.dtype)
        T, K = idx_TK.shape
        out = None
        for start, A, B in self._blocks():
            n = A.shape[0]
            A_flat, B_flat = self._flat(A, B)
            z_Tnr = (x_TD @ A_flat.T).view(T, 1, n, self.r)
            onehot_TKn = self._onehot(idx_TK, start, n) * self.scaling  # scaling folded into the mask
            y = (z_Tnr * onehot_TKn[..., None]).reshape(T * K, n * self.r) @ B_flat.T
            out = y if out is None else out + y
        return out.view(T, K, self.d_out)

    def per_slot_reduce(self, h_TKD: Tensor, idx_TK: Tensor, w_TK: Tensor) -> Tensor:
        """sum_k w_tk * s * B_{idx_tk} A_{idx_tk} h_tk  -> (T, d_out)."""
        h_TKD = h_TKD.to(self.dtype)
        T, K = idx_TK.shape
        out = None
        for start, A, B in self._blocks():
            n = A.shape[0]
            A_flat, B_flat = self._flat(A, B)
            z_TKnr = (h_TKD @ A_flat.T).view(T, K, n, self.r)
            gate_TKn = self._onehot(idx_TK, start, n) * (w_TK[..., None].to(self.dtype) * self.scaling)
            z_Tnr = (z_TKnr * gate_TKn[..., None]).sum(1)
            y = z_Tnr.reshape(T, n * self.r) @ B_flat.T
            out = y if out is None else out + y
        return out

    def _onehot(self, idx_TK: Tensor, start: int, n: int) -> Tensor:
        """(T, K, n) in the expert dtype: 1 where slot k of token t uses expert start + j."""
        experts = torch.arange(start, start + n, device=idx_TK.device)
        return (idx_TK[..., None] == experts).to(self.dtype)

    # ---- reference path --------------------------------------------------------------------------
    def expert(self, e: int, x_ND: Tensor) -> Tensor:
        """One expert's delta s * B_e A_e x, the obvious way  -> (N, d_out)."""
        for start, A, B in self._blocks():
            if start <= e < start + A.shape[0]:
                x_ND = x_ND.to(self.dtype)
                return ((x_ND @ A[e - start].T) * self.scaling) @ B[e - start].T  # scale the (N, r) side
        raise IndexError(f"expert {e} out of range 0..{self.num_experts - 1}")
