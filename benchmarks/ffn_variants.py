"""Prototype faster `MoEFFN` fast paths and time them against the current one (MLP block, fwd+bwd).

Not library code: a place to measure proposals before they go into `moetune/layers.py` / `experts.py`.
Each variant reads the weights of a real `MoEFFN` (built by benchmarks/speed.py's `Bench`), is checked
against `MoEFFN._fast` (outputs and gradients, dropout off), then timed interleaved with the current path
and with peft LoRA r=16 on the same MLP:

  current  MoEFFN._fast as in the library
  v2       dense in rank space, leaner: one GEMM for the gate+up A's, LoRA scaling folded into the
           one-hot mask (no (T,K,F) multiply), base output added inside the B GEMM (baddbmm), slot-major
           (K,T,F) layout, mixing  sum_k w_k h_k + (1 - sum_k w_k) h0  with addcmul, down-LoRA A/B with
           the gate folded into the rank-space mask, dropout mask on (T,F) shared by the K slots
  v3       sort slots by expert once + torch._grouped_mm for every expert GEMM (work independent of E)

    python benchmarks/ffn_variants.py --model small --experts 8,64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from speed import Bench  # noqa: E402

PROJ = ("gate_proj", "up_proj", "down_proj")


def _route(layer, x_TD: torch.Tensor):
    routing, _ = layer.route(x_TD, x_TD.shape[:-1])
    return layer._slots(routing, x_TD.shape[0])


def _banks(layer):
    out = []
    for p in PROJ:
        bank = layer.experts[p]
        assert len(bank.lora_A) == 1, "prototype: one expert block"
        out.append((bank.lora_A[0], bank.lora_B[0], bank.scaling))  # A (E,r,d_in), B (E,d_out,r)
    return out


def _dropout_shared(layer, h_KTF: torch.Tensor) -> torch.Tensor:
    """Dropout with one (T,F) mask for all K slots of a token (bernoulli on T*F, not K*T*F numbers)."""
    drop = layer.lora_dropout
    if not layer.training or not isinstance(drop, torch.nn.Dropout) or drop.p == 0:
        return h_KTF
    mask_TF = torch.empty(h_KTF.shape[1:], dtype=h_KTF.dtype).bernoulli_(1 - drop.p) / (1 - drop.p)
    return h_KTF * mask_TF


def v2(layer, x: torch.Tensor, *, keep_h0: bool = True) -> torch.Tensor:
    lead, D = x.shape[:-1], x.shape[-1]
    x_TD = x.reshape(-1, D)
    T = x_TD.shape[0]
    idx_TK, w_TK = _route(layer, x_TD)
    K = idx_TK.shape[1]
    (Ag, Bg, s), (Au, Bu, _), (Ad, Bd, _) = _banks(layer)
    E, r = Ag.shape[0], Ag.shape[1]
    mlp = layer.base_layer
    xd_TD = layer.lora_dropout(x_TD)
    # one GEMM gives every expert's x A for gate and up
    z_T2n = xd_TD @ torch.cat([Ag.reshape(E * r, -1), Au.reshape(E * r, -1)]).T
    onehot_KTE = (idx_TK.T[..., None] == torch.arange(E)).to(x.dtype)  # (K,T,E)
    mask_KTE1 = (onehot_KTE * s)[..., None]  # LoRA scaling folded into the mask
    zg_KTn = (z_T2n[:, : E * r].view(1, T, E, r) * mask_KTE1).view(K, T, E * r)
    zu_KTn = (z_T2n[:, E * r :].view(1, T, E, r) * mask_KTE1).view(K, T, E * r)
    Bg_nF = Bg.permute(0, 2, 1).reshape(E * r, -1)  # (E r, F)
    Bu_nF = Bu.permute(0, 2, 1).reshape(E * r, -1)
    base_g = mlp.gate_proj(x_TD)
    base_u = mlp.up_proj(x_TD)
    g_KTF = torch.baddbmm(base_g.unsqueeze(0), zg_KTn, Bg_nF.expand(K, -1, -1))
    u_KTF = torch.baddbmm(base_u.unsqueeze(0), zu_KTn, Bu_nF.expand(K, -1, -1))
    act = mlp.act_fn
    h_KTF = act(g_KTF) * u_KTF
    w_KT1 = w_TK.T[..., None].to(x.dtype)
    if keep_h0:  # exact for any router: h0 + sum_k w_k (h_k - h0) = sum_k w_k h_k + (1 - sum_k w_k) h0
        h0_TF = act(base_g) * base_u
        mixed = h0_TF * (1 - w_KT1.sum(0))
    else:  # only when the weights are known to sum to 1 (topk)
        mixed = h_KTF[0] * w_KT1[0]
    for k in range(0 if keep_h0 else 1, K):
        mixed = torch.addcmul(mixed, h_KTF[k], w_KT1[k])
    y = mlp.down_proj(mixed)
    hd_KTF = _dropout_shared(layer, h_KTF)
    Ad_nF = Ad.reshape(E * r, -1)
    zd = (hd_KTF @ Ad_nF.T).view(K, T, E, r) * (onehot_KTE * (w_KT1 * s))[..., None]
    y = torch.addmm(y, zd.sum(0).view(T, E * r), Bd.permute(0, 2, 1).reshape(E * r, -1))
    return y.view(*lead, -1)


def v3(layer, x: torch.Tensor, *, keep_h0: bool = True) -> torch.Tensor:
    """Sort the T*K slots by expert once; every expert GEMM is one torch._grouped_mm over the sorted rows."""
    lead, D = x.shape[:-1], x.shape[-1]
    x_TD = x.reshape(-1, D)
    T = x_TD.shape[0]
    idx_TK, w_TK = _route(layer, x_TD)
    K = idx_TK.shape[1]
    (Ag, Bg, s), (Au, Bu, _), (Ad, Bd, _) = _banks(layer)
    E = Ag.shape[0]
    mlp = layer.base_layer
    e_S = idx_TK.reshape(-1)  # slot s = t*K + k
    order = torch.argsort(e_S, stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    offs = torch.bincount(e_S, minlength=E).cumsum(0).to(torch.int32)
    tok = order // K  # token of each sorted slot
    xd_TD = layer.lora_dropout(x_TD)
    xs = xd_TD.index_select(0, tok)  # (S, d)
    # A's of gate and up side by side: (E, d, 2r) -> one grouped GEMM
    A_gu = torch.cat([Ag, Au], 1).transpose(1, 2).contiguous()
    z = torch._grouped_mm(xs, A_gu, offs=offs) * s  # (S, 2r)
    r = Ag.shape[1]
    dg = torch._grouped_mm(z[:, :r].contiguous(), Bg.transpose(1, 2).contiguous(), offs=offs)  # (S, F)
    du = torch._grouped_mm(z[:, r:].contiguous(), Bu.transpose(1, 2).contiguous(), offs=offs)
    base_g = mlp.gate_proj(x_TD)
    base_u = mlp.up_proj(x_TD)
    g_TKF = base_g[:, None] + dg.index_select(0, inv).view(T, K, -1)
    u_TKF = base_u[:, None] + du.index_select(0, inv).view(T, K, -1)
    act = mlp.act_fn
    h_TKF = act(g_TKF) * u_TKF
    w_TK1 = w_TK[..., None].to(x.dtype)
    if keep_h0:
        h0_TF = act(base_g) * base_u
        mixed = h0_TF * (1 - w_TK1.sum(1))
    else:
        mixed = h_TKF[:, 0] * w_TK1[:, 0]
    for k in range(0 if keep_h0 else 1, K):
        mixed = torch.addcmul(mixed, h_TKF[:, k], w_TK1[:, k])
    y = mlp.down_proj(mixed)
    hd = _dropout_shared(layer, h_TKF.transpose(0, 1)).transpose(0, 1)  # (T,K,F)
    hs = hd.reshape(T * K, -1).index_select(0, order)  # (S, F) sorted
    zd = torch._grouped_mm(hs, Ad.transpose(1, 2).contiguous(), offs=offs)  # (S, r)
    zd = zd * (w_TK.reshape(-1)[order] * s)[:, None].to(x.dtype)
    yd = torch._grouped_mm(zd, Bd.transpose(1, 2).contiguous(), offs=offs)  # (S, d)
    y = y.index_add(0, tok, yd)
    return y.view(*lead, -1)


VARIANTS = {
    "current": lambda layer, x: layer(x),
    "v2": v2,
    "v2-no-h0": lambda layer, x: v2(layer, x, keep_h0=False),
    "v3": v3,
}


def check(layer, hidden: int) -> dict[str, float]:
    """Max relative error of each variant's output and gradients (input, experts, router) vs `current`."""
    g = torch.Generator().manual_seed(0)
    saved = [(b.lora_B[0].detach().clone()) for b in (layer.experts[p] for p in PROJ)]
    with torch.no_grad():
        for p in PROJ:
            layer.experts[p].lora_B[0].normal_(0, 0.02, generator=g)
    was = layer.training
    layer.eval()
    x = torch.randn(2, 64, hidden, generator=g, dtype=torch.float32)
    gy = torch.randn(2, 64, hidden, generator=g)
    out = {}
    ref = None
    params = [p for p in layer.parameters() if p.requires_grad]
    for name, fn in VARIANTS.items():
        for p in params:
            p.grad = None
        xi = x.clone().requires_grad_(True)
        y = fn(layer, xi)
        y.backward(gy)
        got = [y.detach(), xi.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if ref is None:
            ref = got
            continue
        out[name] = max(
            ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            for a, b in zip(got, ref, strict=True)
        )
    layer.train(was)
    with torch.no_grad():
        for p, b in zip(PROJ, saved, strict=True):
            layer.experts[p].lora_B[0].copy_(b)
    for p in layer.parameters():
        p.grad = None
    return out


def time_fwd_bwd(fn, x0: torch.Tensor, gy: torch.Tensor, params) -> float:
    x = x0.detach().requires_grad_(True)
    t0 = time.perf_counter()
    y = fn(x)
    y.backward(gy)
    dt = time.perf_counter() - t0
    for p in params:
        p.grad = None
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", choices=["small", "ffn-heavy"])
    ap.add_argument("--experts", default="8,64")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    peft = Bench(args.model, "peft-lora-r16", args.batch, args.seq, 0.05)
    layers = {}
    for e in [int(v) for v in args.experts.split(",")]:
        b = Bench(args.model, f"moetune-ffn-e{e}", args.batch, args.seq, 0.05)
        layer = b.mlp
        print(
            f"E={e}: max rel. error vs current (output and all gradients): {check(layer, b.hidden)}",
            flush=True,
        )
        layers[e] = (b, layer)
    x0, gy = peft.mlp_x, peft.mlp_grad
    cases = {"peft-lora-r16": (lambda x: peft.mlp(x), peft.params)}
    for e, (b, layer) in layers.items():
        for name, fn in VARIANTS.items():
            cases[f"E={e} {name}"] = (lambda x, fn=fn, layer=layer: fn(layer, x), b.params)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(args.repeats + 2):
        for name, (fn, params) in cases.items():
            dt = time_fwd_bwd(fn, x0, gy, params)
            if rep >= 2:
                times[name].append(dt)
    base = statistics.median(times["peft-lora-r16"])
    print(
        f"\n{args.model}, MLP block fwd+bwd, {args.batch}x{args.seq} tokens, "
        f"{args.repeats} interleaved repeats"
    )
    print("| variant | median ms | min–max | × peft LoRA r=16 |\n|---|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m * 1e3:.0f} | {min(ts) * 1e3:.0f}–{max(ts) * 1e3:.0f} | {m / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
