import math

import pytest
import torch
import torch.nn.functional as F

from moetune.core.losses import contrastive_loss, importance_loss, switch_aux_loss, z_loss

LN2, LN3 = math.log(2.0), math.log(3.0)


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def softmax2(a: float, b: float) -> tuple[float, float]:
    ea, eb = math.exp(a), math.exp(b)
    return ea / (ea + eb), eb / (ea + eb)


# ---------------------------------------------------------------- switch_aux_loss


def test_switch_aux_hand_unbalanced():
    # E=2, k=1, 3 tokens. Top-1 picks expert 0, 0, 1 -> f = [2/3, 1/3].
    logits = [[1.0, 0.0], [2.0, -1.0], [0.0, 0.5]]
    p = [softmax2(a, b) for a, b in logits]
    P0 = (p[0][0] + p[1][0] + p[2][0]) / 3
    P1 = (p[0][1] + p[1][1] + p[2][1]) / 3
    expected = 2 * (2 / 3 * P0 + 1 / 3 * P1)
    assert switch_aux_loss(t64(logits), top_k=1).item() == pytest.approx(expected, abs=1e-12)
    # Same probabilities, but a capacity drop removes token 1's slot: f = [1/2, 1/2] -> E * (P0 + P1) / 2 = 1.
    sel = torch.tensor([[True, False], [False, False], [False, True]])
    assert switch_aux_loss(t64(logits), top_k=1, selected=sel).item() == pytest.approx(1.0, abs=1e-12)
    # Variable k: token 0 uses both experts, tokens 1, 2 use expert 0 -> 4 slots, f = [3/4, 1/4].
    sel = torch.tensor([[True, True], [True, False], [True, False]])
    expected = 2 * (3 / 4 * P0 + 1 / 4 * P1)
    assert switch_aux_loss(t64(logits), top_k=1, selected=sel).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_switch_aux_balanced_is_one(k):
    E, T = 6, 12
    # Uniform probabilities (ties broken arbitrarily by top-k): P_i = 1/E -> E * sum_i f_i / E = 1.
    assert switch_aux_loss(torch.zeros(T, E), top_k=k).item() == pytest.approx(1.0, abs=1e-6)
    # Slots spread equally (f_i = 1/E) with arbitrary P: E * sum_i P_i / E = 1.
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(k))
    idx = (torch.arange(T)[:, None] + torch.arange(k)[None, :]) % E  # (T, k), each expert k*T/E times
    assert switch_aux_loss(logits, top_k=k, selected=idx).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_switch_aux_selected_forms_agree(k):
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    idx = logits.topk(k, dim=-1).indices  # (2, 5, k)
    assign = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)  # (2, 5, E)
    default = switch_aux_loss(logits, top_k=k, mask=mask)
    torch.testing.assert_close(switch_aux_loss(logits, top_k=k, mask=mask, selected=idx), default)
    torch.testing.assert_close(switch_aux_loss(logits, top_k=k, mask=mask, selected=assign), default)


@pytest.mark.parametrize("k", [1, 2])
def test_switch_aux_is_mixtral_over_k(k):
    # Mixtral's formula (transformers load_balancing_loss_func), written out: counts / T, not / (T k).
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expert_mask = F.one_hot(logits.topk(k, dim=-1).indices, 4).double()  # (T, k, E)
    mixtral = 4 * (expert_mask.mean(dim=0) * logits.softmax(-1).mean(dim=0)[None]).sum()
    torch.testing.assert_close(k * switch_aux_loss(logits, top_k=k), mixtral)


def test_switch_aux_no_slot_is_zero():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = switch_aux_loss(logits, top_k=1, selected=torch.zeros(3, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(3, 4))


def test_switch_aux_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        switch_aux_loss(torch.zeros(2, 3), top_k=4)


# ---------------------------------------------------------------- z_loss


def test_z_loss_hand():
    # logsumexp([ln3, 0]) = ln(3 + 1) = 2 ln2; logsumexp([0, 0]) = ln2; logsumexp([5, 5]) = 5 + ln2.
    logits = t64([[LN3, 0.0], [0.0, 0.0], [5.0, 5.0]])
    expected = ((2 * LN2) ** 2 + LN2**2 + (5 + LN2) ** 2) / 3
    assert z_loss(logits).item() == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- importance_loss


def test_importance_hand_dense():
    # p = [3/4, 1/4], [1/2, 1/2] -> Imp = [5/4, 3/4], mean 1, var ((1/4)^2 + (1/4)^2) / 2 = 1/16.
    logits = t64([[LN3, 0.0], [0.0, 0.0]])
    assert importance_loss(logits).item() == pytest.approx((1 / 16) / (1 + 1e-10), abs=1e-12)
    # Balanced importance -> 0.
    assert importance_loss(t64([[LN3, 0.0], [0.0, LN3]])).item() == pytest.approx(0.0, abs=1e-12)


def test_importance_hand_top_k():
    # k=1: every gate is 1 on the argmax: experts 0, 1, 0 -> Imp = [2, 1, 0], mean 1, var (1+0+1)/3.
    logits = t64([[2.0, 1.0, 0.0], [0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert importance_loss(logits, top_k=1).item() == pytest.approx((2 / 3) / (1 + 1e-10), abs=1e-12)
    # k=2: token 0 keeps [ln3, 0] -> [3/4, 1/4, 0]; token 1 keeps [0, 0] -> [0, 1/2, 1/2].
    # Imp = [3/4, 3/4, 1/2], mean 2/3, var ((1/12)^2 + (1/12)^2 + (1/6)^2) / 3 = 1/72; 1/72 / (4/9) = 1/32.
    logits = t64([[LN3, 0.0, -5.0], [-5.0, 0.0, 0.0]])
    assert importance_loss(logits, top_k=2).item() == pytest.approx((1 / 72) / (4 / 9 + 1e-10), abs=1e-12)


def test_importance_hand_gates():
    # gates used as given: Imp = [2, 0], mean 1, var 1; logits are ignored and get no gradient.
    logits = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    gates = t64([[1.0, 0.0], [1.0, 0.0]]).requires_grad_()
    loss = importance_loss(logits, top_k=1, gates=gates)
    assert loss.item() == pytest.approx(1 / (1 + 1e-10), abs=1e-12)
    loss.backward()
    assert logits.grad is None and gates.grad is not None


# ---------------------------------------------------------------- contrastive_loss


def nce(pos: float, negs: list[float], tau: float) -> float:
    return -math.log(math.exp(pos / tau) / (math.exp(pos / tau) + sum(math.exp(n / tau) for n in negs)))


def test_contrastive_expert_hand():
    # T=2, E=2, D=2, tau=1. Token 0: a0=[1,0], a1=[0,1]; token 1: b0=[1,1], b1=[0,1]; all active.
    o = t64([[[1, 0], [0, 1]], [[1, 1], [0, 1]]])
    r = 1 / math.sqrt(2)
    expected = (
        nce(r, [0.0], 1)  # i=0, anchor a0: positive b0 (cos 1/sqrt2), negative b1 (cos 0)
        + nce(r, [r], 1)  # i=0, anchor b0: positive a0 (1/sqrt2), negative a1 (1/sqrt2) -> ln 2
        + nce(1.0, [r], 1)  # i=1, anchor a1: positive b1 (1), negative b0 (1/sqrt2)
        + nce(1.0, [0.0], 1)  # i=1, anchor b1: positive a1 (1), negative a0 (0)
    ) / 4
    loss = contrastive_loss(o, torch.ones(2, 2, dtype=torch.bool), mode="expert", temperature=1.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # Expert 1 active only on token 0 -> no pair for it; only expert 0's two terms remain.
    active = torch.tensor([[True, True], [True, False]])
    loss = contrastive_loss(o, active, mode="expert", temperature=1.0)
    assert loss.item() == pytest.approx((nce(r, [0.0], 1) + math.log(2)) / 2, abs=1e-6)


def test_contrastive_survey_hand():
    # One token, E=3: o0=[1,0], o1=[1,1], o2=[0,1]; S = {0, 1}, N = {2}; tau = 0.5.
    o = t64([[[1, 0], [1, 1], [0, 1]]])
    r = 1 / math.sqrt(2)
    expected = (
        nce(r, [0.0], 0.5)  # (0, 1): s(o0, o1) = 1/sqrt2, negative s(o0, o2) = 0
        + nce(r, [r], 0.5)  # (1, 0): s(o1, o0) = 1/sqrt2, negative s(o1, o2) = 1/sqrt2
    ) / 2
    loss = contrastive_loss(o, torch.tensor([[True, True, False]]), mode="survey", temperature=0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_contrastive_zero_outputs_constant():
    # s = 0 everywhere. Expert mode: every term is -log(1 / (1 + (E-1))) = log E.
    E = 4
    active = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    o = torch.zeros(3, E, 5, requires_grad=True)
    loss = contrastive_loss(o, active, mode="expert")
    assert loss.item() == pytest.approx(math.log(E), abs=1e-6)
    loss.backward()
    assert torch.isfinite(o.grad).all()
    # Survey mode: term = log(1 + |N_t|). Token 0: 2 pairs, |N| = 2; token 1: 6 pairs, |N| = 1; token 2: none.
    expected = (2 * math.log(3) + 6 * math.log(2)) / 8
    assert contrastive_loss(o, active, mode="survey").item() == pytest.approx(expected, abs=1e-6)


def test_contrastive_bad_mode():
    with pytest.raises(ValueError, match="'pairwise'.*expert.*survey"):
        contrastive_loss(torch.zeros(2, 2, 3), torch.ones(2, 2, dtype=torch.bool), mode="pairwise")


def cos(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    return (a @ b) / torch.sqrt((a @ a + eps) * (b @ b + eps))


def slow_contrastive(o, active, mask, mode, tau, eps=1e-8):
    T, E, _ = o.shape
    real = [t for t in range(T) if mask[t]]
    terms = []
    for t in real:
        for i in range(E):
            if mode == "expert":
                for u in real:
                    if u == t or not (active[t, i] and active[u, i]):
                        continue
                    pos = torch.exp(cos(o[t, i], o[u, i], eps) / tau)
                    negs = sum(torch.exp(cos(o[t, i], o[u, j], eps) / tau) for j in range(E) if j != i)
                    terms.append(-torch.log(pos / (pos + negs)))
            elif active[t, i]:
                for j in range(E):
                    if j == i or not active[t, j]:
                        continue
                    pos = torch.exp(cos(o[t, i], o[t, j], eps) / tau)
                    negs = sum(
                        torch.exp(cos(o[t, i], o[t, n], eps) / tau) for n in range(E) if not active[t, n]
                    )
                    terms.append(-torch.log(pos / (pos + negs)))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("mode", ["expert", "survey"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_matches_slow_reference(mode, seed):
    g = torch.Generator().manual_seed(seed)
    T, E, D = 6, 4, 3
    o = torch.randn(T, E, D, generator=g, dtype=torch.float64)
    active = torch.rand(T, E, generator=g) > 0.4
    mask = torch.tensor([True, True, False, True, True, True])
    for tau in (0.1, 1.0):
        got = contrastive_loss(o, active, mask=mask, mode=mode, temperature=tau)
        torch.testing.assert_close(got, slow_contrastive(o, active, mask, mode, tau))


@pytest.mark.parametrize("mode", ["expert", "survey"])
def test_contrastive_no_term_is_connected_zero(mode):
    o = torch.randn(3, 4, 2, requires_grad=True)
    active = torch.zeros(3, 4, dtype=torch.bool)
    active[0, 0] = True  # one active slot: no pair in either mode
    loss = contrastive_loss(o, active, mode=mode)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(o.grad, torch.zeros_like(o))


# ---------------------------------------------------------------- shared properties


def _router_losses():
    """(name, fn(logits, mask) -> loss); each fn may derive extra inputs (selected, gates) from logits."""

    def selected_idx(x, m):
        idx = x.detach().topk(2, largest=False).indices  # the 2 *smallest* logits: not the default routing
        idx = torch.where(m[..., None].bool(), idx, -1)  # garbage indices on padding rows
        return switch_aux_loss(x, top_k=2, mask=m, selected=idx)

    def gates(x, m):
        # affine, so that padding rows (inf/nan) still get an exactly-zero gradient through it
        return importance_loss(x, mask=m, gates=0.5 * x + 3.0)

    return [
        ("switch", lambda x, m: switch_aux_loss(x, top_k=2, mask=m)),
        ("switch_idx", selected_idx),
        ("switch_bool", lambda x, m: switch_aux_loss(x, 2, mask=m, selected=x > 0)),
        ("z", lambda x, m: z_loss(x, mask=m)),
        ("importance_dense", lambda x, m: importance_loss(x, mask=m)),
        ("importance_topk", lambda x, m: importance_loss(x, top_k=2, mask=m)),
        ("importance_gates", gates),
    ]


def _contrastive(mode):
    def fn(x, m):
        # x (..., E) -> outputs (T, E, 3), o_{t,i} = x_{t,i} w + x_{t,i-1} v: linear, so padding rows
        # (inf/nan) still get an exactly-zero gradient through it
        x = x.reshape(-1, x.shape[-1])  # (T, E)
        w = torch.tensor([1.0, 2.0, 3.0], dtype=x.dtype)
        v = torch.tensor([1.0, -1.0, 0.5], dtype=x.dtype)
        o = x[..., None] * w + x.roll(1, dims=-1)[..., None] * v  # (T, E, 3)
        active = (x > -0.5) | (m.reshape(-1, 1) == 0)  # padding tokens: garbage activations
        return contrastive_loss(o, active, mask=m.reshape(-1), mode=mode)

    return fn


ALL_LOSSES = _router_losses() + [
    ("contrastive_expert", _contrastive("expert")),
    ("contrastive_survey", _contrastive("survey")),
]
ALL_IDS = [name for name, _ in ALL_LOSSES]
ALL_FNS = [fn for _, fn in ALL_LOSSES]


@pytest.mark.parametrize("fn", ALL_FNS, ids=ALL_IDS)
def test_gradcheck(fn):
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.autograd.gradcheck(lambda x: fn(x, mask), (x.requires_grad_(),))


@pytest.mark.parametrize("fn", ALL_FNS, ids=ALL_IDS)
def test_padding_rows_have_no_influence(fn):
    real = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pad = t64(
        [[1e30] * 6, [-1e30] * 6, [math.inf] * 6, [math.nan] * 6, [math.inf, -math.inf, math.nan, 0, 1, 2]]
    )
    # (B=2, S=5): the real rows interleaved with extreme padding rows
    x = torch.cat([real, pad])[[0, 5, 1, 6, 2, 7, 3, 8, 9, 4]].reshape(2, 5, 6).requires_grad_()
    mask = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0, 0, 1]).reshape(2, 5)
    ref_x = real.clone().requires_grad_()
    ref = fn(ref_x, torch.ones(5, dtype=torch.bool))
    loss = fn(x, mask)
    assert torch.isfinite(loss)
    # float64 rounding apart (the padding rows are weighted by 0, not gathered out: sums run in another order)
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=1e-15)
    loss.backward()
    ref.backward()
    grad = x.grad.reshape(10, 6)
    torch.testing.assert_close(grad[mask.reshape(-1).bool()], ref_x.grad, rtol=1e-13, atol=1e-15)
    assert torch.equal(grad[~mask.reshape(-1).bool()], torch.zeros(5, 6, dtype=torch.float64))


@pytest.mark.parametrize("fn", ALL_FNS, ids=ALL_IDS)
def test_no_real_token_is_connected_zero(fn):
    x = torch.full((2, 3, 4), math.nan, dtype=torch.float64).requires_grad_()
    loss = fn(x, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.shape == ()
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("fn", ALL_FNS, ids=ALL_IDS)
def test_dtypes(fn):
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 4, dtype=torch.bool)
    for dtype, want in [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ]:
        assert fn(x.to(dtype), mask).dtype == want


@pytest.mark.parametrize("kind", ["topk", "topp", "soft", "switch", "threshold"])
def test_balance_losses_equal_the_three_losses(kind):
    """The fused per-router pass equals switch_aux_loss / z_loss / importance_loss on the routing's own
    slots and combine weights, in value and in the logits' gradient; padding rows hold extreme values
    (the router's softmax runs on them: NaN there would reach the gradient through the combine weights,
    before any loss, in both) and get no gradient."""
    from moetune.core.losses import balance_losses
    from moetune.core.routing import ROUTING_FUNCTIONS, Routing

    g = torch.Generator().manual_seed(3)
    T, E = 11, 6
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    base = (2 * torch.randn(T, E, dtype=torch.float64, generator=g)).masked_fill(~mask[:, None], 1e4)
    base[2, 0] = -1e30

    def routing(logits: torch.Tensor) -> Routing:
        probs = logits.softmax(-1)
        tau = torch.full((T, 1), 1.0 / E, dtype=torch.float64)
        idx, w, active = ROUTING_FUNCTIONS[kind](
            probs, probs, logits=logits, mask=mask, top_k=2, top_p=0.6, capacity_factor=1.0, tau=tau
        )
        return Routing(logits, probs, idx, w, active)

    fused_x, split_x = base.clone().requires_grad_(), base.clone().requires_grad_()
    fused = balance_losses(routing(fused_x), mask)
    r = routing(split_x)
    split = {
        "aux_loss": switch_aux_loss(r.logits, 2, mask=mask, selected=r.assignment()),
        "z_loss": z_loss(r.logits, mask=mask),
        "importance_loss": importance_loss(r.logits, mask=mask, gates=r.dense_weights()),
    }
    assert fused.keys() == split.keys()
    for name in split:
        assert torch.isfinite(fused[name]), name
        torch.testing.assert_close(fused[name], split[name], rtol=1e-12, atol=1e-15, msg=name)
    sum(fused.values()).backward()
    sum(split.values()).backward()
    assert torch.equal(fused_x.grad[~mask], torch.zeros(3, E, dtype=torch.float64))
    torch.testing.assert_close(fused_x.grad, split_x.grad, rtol=1e-12, atol=1e-15)
