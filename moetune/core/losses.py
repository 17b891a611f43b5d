"""Auxiliary losses for MoE routers: load balancing, z-loss, importance and expert contrast.

Every function is a pure function of router outputs and returns a 0-dim tensor.

Conventions shared by the router losses:

* ``logits`` has shape ``(..., E)``; the leading dimensions are flattened to ``T`` token rows.
* ``mask`` has the leading shape, 1/True for real tokens and 0/False for padding; ``None`` means all real.
  Padding rows are zeroed (``torch.where``) *before* any arithmetic and weighted by 0, so they may hold
  anything (±1e30, inf, nan): the value and gradients are those of the real rows alone (up to the
  rounding of sums taken in another order), and padding rows get a zero gradient. Weighting instead of
  gathering the real rows spares a GPU one host sync per loss.
* float16/bfloat16 inputs are computed in float32; float32 and float64 are kept, also under
  torch.autocast (turned off inside each loss: its einsum/matmul would run in bf16/fp16).
* With no real token (or no valid term) the result is a zero that is still connected to the graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moetune.core.routing import Routing, no_autocast

CONTRASTIVE_MODES = ("expert", "survey")


def _without_autocast(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The loss computed with torch.autocast off on the device of its first tensor argument."""

    @functools.wraps(loss)
    def wrapped(*args, **kwargs) -> Tensor:
        first = next(v for v in (*args, *kwargs.values()) if isinstance(v, Tensor))
        with no_autocast(first.device):
            return loss(*args, **kwargs)

    return wrapped


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _real_rows(x: Tensor, mask: Tensor | None, lead: torch.Size) -> Tensor:
    """Flatten ``x`` of shape ``(*lead, ...)`` to rows and keep the rows where ``mask`` is set."""
    x, real = _rows(x, mask, lead)
    return x if real is None else x[real]  # (N, ...)


def _rows(x: Tensor, mask: Tensor | None, lead: torch.Size) -> tuple[Tensor, Tensor | None]:
    """``x`` of shape ``(*lead, ...)`` as rows ``(T, ...)`` with the padding rows zeroed (they may hold
    NaN/inf), and the ``(T,)`` bool real-token mask (None: every token is real). The losses weight rows
    by the mask instead of gathering the real ones: a boolean gather waits for its row count (a host
    sync per loss on a GPU)."""
    x = x.reshape(lead.numel(), *x.shape[len(lead) :])  # (T, ...)
    if mask is None:
        return x, None
    if mask.shape != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match leading shape {tuple(lead)}")
    real = mask.reshape(-1).bool()  # (T,)
    return torch.where(_per_row(real, x), x, x.new_zeros(())), real


def _per_row(real_T: Tensor, x: Tensor) -> Tensor:
    """The (T,) mask shaped to broadcast over the rows of ``x`` (T, ...)."""
    return real_T.view(-1, *[1] * (x.dim() - 1))


def _real_sum(x: Tensor, real: Tensor | None) -> Tensor:
    """Sum over the real rows of ``x`` (T, ...), whose other rows are finite  -> (...)."""
    return x.sum(dim=0) if real is None else (x * _per_row(real, x).to(x.dtype)).sum(dim=0)


def _real_mean(x: Tensor, real: Tensor | None) -> Tensor:
    """Mean over the real rows of ``x`` (T, ...), whose other rows are finite (0 without real rows)."""
    if real is None:
        return x.mean(dim=0)
    return _real_sum(x, real) / real.sum().clamp_min(1).to(x.dtype)


def _switch(p: Tensor, counts: Tensor, real: Tensor | None) -> Tensor:
    """E sum_i f_i P_i from the probabilities p (T, E) and the slots each row gives each expert (T, E)."""
    slots = _real_sum(counts.to(p.dtype), real)  # (E,)
    f = slots / slots.sum().clamp_min(1)  # (E,); no real token: f = 0 and L = 0
    return p.shape[-1] * (f * _real_mean(p, real)).sum()


def _z(x: Tensor, real: Tensor | None) -> Tensor:
    """mean over real rows of logsumexp(x)^2, x (T, E)."""
    return _real_mean(x.logsumexp(dim=-1).square(), real)


def _cv_squared(G: Tensor, real: Tensor | None) -> Tensor:
    """CV^2 over the experts of the gates G (T, E) summed over real rows (0 without real rows)."""
    imp = _real_sum(G, real)  # (E,)
    return imp.var(correction=0) / (imp.mean().square() + 1e-10)


@_without_autocast
def switch_aux_loss(
    logits: Tensor, top_k: int, mask: Tensor | None = None, selected: Tensor | None = None
) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, "Switch Transformers", eq. 4).

    With ``p = softmax(logits)`` over the E experts and, over the real tokens,

        f_i = (routing slots assigned to expert i) / (all assigned slots)
        P_i = mean_t p_{t,i}
        L   = E * sum_i f_i * P_i

    Perfectly balanced routing (``f`` uniform, or ``P`` uniform) gives exactly 1 for any ``k``.
    Gradients flow only through ``P``; ``f`` is a count.

    Args:
        logits: ``(..., E)`` router logits.
        top_k: experts per token; only used when ``selected`` is None (routing = top-k of the logits).
        mask: ``(...)`` real-token mask, or None.
        selected: the routing actually performed, either a LongTensor ``(..., k)`` of expert indices
            (each entry is one slot), or a BoolTensor ``(..., E)`` assignment mask (each True is one
            slot; for variable-k routers and capacity drops). If no slot is assigned, ``f = 0``.

    Note: transformers' Mixtral ``load_balancing_loss_func`` returns ``k`` times this value, because it
    divides the slot counts by ``T`` rather than by ``T * k``. The loss is meaningless for dense (soft)
    routing, where every expert gets every token and ``f`` is uniform by construction.
    """
    E = logits.shape[-1]
    lead = logits.shape[:-1]
    x, real = _rows(logits, mask, lead)
    p = _upcast(x).softmax(dim=-1)  # (T, E)
    if selected is None:
        if not 1 <= top_k <= E:
            raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
        counts = F.one_hot(x.topk(top_k, dim=-1).indices, E).sum(dim=-2)  # (T, E)
    elif selected.dtype == torch.bool:
        counts = _rows(selected, mask, lead)[0]  # (T, E)
    else:
        counts = F.one_hot(_rows(selected, mask, lead)[0].long(), E).sum(dim=-2)  # (T, E)
    return _switch(p, counts, real)


@_without_autocast
def balance_losses(routing: Routing, mask: Tensor | None = None) -> dict[str, Tensor]:
    """One router's three balance losses in one pass (what a MoE layer adds each forward):

        aux_loss         switch_aux_loss(logits, selected=routing.assignment())
        z_loss           z_loss(logits)
        importance_loss  importance_loss(logits, gates=routing.dense_weights())

    over the real tokens of ``mask`` (T,), equal to those functions (tests/test_losses.py). They share
    the masking and the upcast logits: fewer operations, which on a GPU are kernel launches, once per
    layer and forward. (The softmax is taken again from the masked logits rather than read from
    ``routing.probs``, so that, as in `switch_aux_loss`, no padding row reaches its gradient.)
    """
    lead = routing.logits.shape[:-1]
    logits, real = _rows(_upcast(routing.logits), mask, lead)  # (T, E)
    gates = _rows(_upcast(routing.dense_weights()), mask, lead)[0]  # (T, E)
    return {
        "aux_loss": _switch(logits.softmax(dim=-1), routing.assignment(), real),
        "z_loss": _z(logits, real),
        "importance_loss": _cv_squared(gates, real),
    }


@_without_autocast
def z_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Router z-loss (Zoph et al. 2022, "ST-MoE", eq. 5): ``mean_t (logsumexp_i z_{t,i})^2`` over real t."""
    x, real = _rows(_upcast(logits), mask, logits.shape[:-1])  # (T, E)
    return _z(x, real)


@_without_autocast
def importance_loss(
    logits: Tensor, top_k: int | None = None, mask: Tensor | None = None, gates: Tensor | None = None
) -> Tensor:
    """Importance loss (Shazeer et al. 2017, "Outrageously Large Neural Networks", eq. 6).

        Importance_i = sum_t G_{t,i}          (over real tokens)
        L            = CV(Importance)^2 = Var(Importance) / (Mean(Importance)^2 + 1e-10)

    with the population variance over the E experts. ``G`` is the gate actually used to combine experts:

    * ``gates`` ``(..., E)`` if given (the layer's real combine weights; ``logits`` then only gives the
      leading shape and gets no gradient);
    * else, if ``top_k`` is given, the softmax over each token's ``top_k`` largest logits, 0 elsewhere;
    * else the dense softmax of the logits.
    """
    lead = logits.shape[:-1]
    if gates is not None:
        G, real = _rows(_upcast(gates), mask, lead)  # (T, E)
    else:
        x, real = _rows(_upcast(logits), mask, lead)  # (T, E)
        if top_k is None:
            G = x.softmax(dim=-1)  # (T, E)
        else:
            top, idx = x.topk(top_k, dim=-1)  # (T, k)
            G = torch.zeros_like(x).scatter(-1, idx, top.softmax(dim=-1))  # (T, E)
    return _cv_squared(G, real)


def _cosine_unit(o: Tensor, eps: float) -> Tensor:
    # a / sqrt(|a|^2 + eps), so that unit(a) . unit(b) = a.b / sqrt((|a|^2 + eps)(|b|^2 + eps))
    return o * (o.square().sum(dim=-1, keepdim=True) + eps).rsqrt()


@_without_autocast
def contrastive_loss(
    expert_outputs: Tensor,
    active: Tensor,
    mask: Tensor | None = None,
    mode: str = "expert",
    temperature: float = 0.1,
    eps: float = 1e-8,
) -> Tensor:
    """Contrastive expert loss (InfoNCE), pushing the experts' outputs apart.

    ``o_{t,i}`` is expert i's output (its LoRA delta) on token t, ``s`` the eps-smoothed cosine

        s(a, b) = a.b / sqrt((|a|^2 + eps) (|b|^2 + eps))

    (all-zero outputs, as at LoRA initialisation, give s = 0 and a finite constant loss), and tau the
    temperature. Only real tokens (``mask``) take part.

    ``mode="expert"`` (Luo et al. 2024, "MoELoRA: Contrastive learning guided mixture of experts on
    parameter-efficient fine-tuning"): each expert's outputs form a cluster, distinct from the others'.
    For every expert i and ordered pair of distinct tokens t != t' on which i is active:

        term(i, t, t') = -log( exp(s(o_{t,i}, o_{t',i})/tau)
                               / sum_j exp(s(o_{t,i}, o_{t',j})/tau) )      (j over all E experts)

    i.e. anchor o_{t,i}, positive o_{t',i}, negatives o_{t',j} for j != i.

    ``mode="survey"``: on each token t, with activated set S_t (|S_t| >= 2) and the other experts N_t,
    for every ordered pair i != j in S_t (all outputs on token t):

        term(t, i, j) = -log( exp(s(o_i, o_j)/tau)
                              / (exp(s(o_i, o_j)/tau) + sum_{n in N_t} exp(s(o_i, o_n)/tau)) )

    The loss is the mean of all terms; with no term it is a graph-connected zero. Memory is
    O(T^2 E^2) for "expert" and O(T E^3) for "survey".

    Args:
        expert_outputs: ``(T, E, D)`` every expert's output on each of T (sampled) tokens.
        active: ``(T, E)`` bool, the experts the router activated on each token.
        mask: ``(T,)`` real-token mask, or None.
        mode: "expert" or "survey".
        temperature: tau.
        eps: smoothing inside the cosine norm.
    """
    if mode not in CONTRASTIVE_MODES:
        raise ValueError(f"unknown contrastive mode {mode!r}; expected one of {CONTRASTIVE_MODES}")
    lead = expert_outputs.shape[:1]
    o = _upcast(_real_rows(expert_outputs, mask, lead))  # (T, E, D)
    act = _real_rows(active, mask, lead).bool()  # (T, E)
    T, E, _ = o.shape
    u = _cosine_unit(o, eps)  # (T, E, D)
    if mode == "expert":
        sim = torch.einsum("tid,ujd->tiuj", u, u) / temperature  # (T, E, T, E): s(o_ti, o_uj) / tau
        pos = sim.diagonal(dim1=1, dim2=3)  # (T, T, E): [t, u, i] = s(o_ti, o_ui) / tau
        lse = sim.logsumexp(dim=-1).permute(0, 2, 1)  # (T, T, E): [t, u, i]
        other = ~torch.eye(T, dtype=torch.bool, device=o.device)  # (T, T)
        valid = act[:, None, :] & act[None, :, :] & other[:, :, None]  # (T, T, E)
        terms = (lse - pos)[valid]
    else:
        sim = torch.einsum("tid,tjd->tij", u, u) / temperature  # (T, E, E): s(o_ti, o_tj) / tau
        eye = torch.eye(E, dtype=torch.bool, device=o.device)  # (E, E)
        # denominator of pair (i, j) runs over k in {j} | N_t; it is never empty, so logsumexp stays finite
        in_denom = eye | ~act[:, None, :]  # (T, E_j, E_k)
        den = sim[:, :, None, :].masked_fill(~in_denom[:, None], float("-inf"))  # (T, E_i, E_j, E_k)
        lse = den.logsumexp(dim=-1)  # (T, E_i, E_j)
        valid = act[:, :, None] & act[:, None, :] & ~eye  # (T, E, E)
        terms = (lse - sim)[valid]
    return terms.mean() if terms.numel() else terms.sum()
