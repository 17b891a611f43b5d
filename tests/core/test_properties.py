"""Property tests (hypothesis) of the routers and the balance losses.

Every router kind runs through the real `Router` module: its weight is set to the identity (so the logits
are exactly the drawn values, which are float32-representable) and, for `threshold`, its AdaMoLE threshold
network gets drawn weights. Properties, for random logits, padding masks, k, top_p, capacity_factor,
threshold_max and expert biases (aux-loss-free balancing):

* slots: indices in [0, E); weights >= 0 and 0 on inactive slots; per routed token the weights sum to 1
  for topk / topp / soft (`Router.WEIGHTS_SUM_TO_ONE`). By design the others differ:
  `switch` uses p itself as the gate (Switch Transformer) and drops overflow tokens (weight 0), so its
  weight is p_argmax <= 1 or 0; `threshold` (AdaMoLE) routes nothing when no probability reaches tau,
  so its weights sum to 1 or to 0.
* padding never counts: padding rows' logits replaced by anything (nan, ±inf, ±1e30) change no loss, no
  statistic and no real token's routing; dropping the padding rows altogether changes nothing either.
* token order: permuting the tokens permutes indices / weights / active flags the same way and leaves the
  losses and statistics unchanged. Exception, by design: `switch` capacity is first come, first served
  (each expert takes the first ceil(capacity_factor * T / E) real tokens in token order), so *which* tokens
  overflow depends on the order; the per-expert counts, the Switch aux loss, the z-loss and the statistics
  stay invariant, and everything is invariant when nothing overflows.
* losses are finite and within their known bounds (see each test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import Tensor

from moetune.core import losses, stats
from moetune.core.routing import ROUTING_FUNCTIONS, Router, Routing, max_slots
from moetune.core.stats import accumulate_stats

# deterministic in CI (same examples every run), no example database written into the tree
PROPS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KINDS = tuple(ROUTING_FUNCTIONS)
JUNK = [math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0, 3.0]


def f32(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, width=32)


@dataclass
class Case:
    """A router configuration and a batch of T tokens (logits (T, E), mask (T,))."""

    kind: str
    logits: list[list[float]]
    mask: list[bool]
    top_k: int
    top_p: float
    capacity_factor: float
    threshold_max: float | None
    tau_w: list[float]
    tau_b: float
    bias: list[float] | None
    dtype: str

    @property
    def E(self) -> int:
        return len(self.logits[0])

    @property
    def T(self) -> int:
        return len(self.logits)

    def x(self) -> Tensor:
        return torch.tensor(self.logits, dtype=torch.float64)

    def m(self) -> Tensor:
        return torch.tensor(self.mask, dtype=torch.bool)

    def router(self) -> Router:
        router = Router(
            self.E,
            self.E,
            kind=self.kind,
            top_k=self.top_k,
            top_p=self.top_p,
            capacity_factor=self.capacity_factor,
            threshold_max=self.threshold_max,
            router_dtype=self.dtype,
        )
        with torch.no_grad():
            router.weight_blocks[0].copy_(torch.eye(self.E))  # logits = the router input, exactly
            if router.threshold is not None:
                router.threshold.weight.copy_(torch.tensor([self.tau_w]))
                router.threshold.bias.fill_(self.tau_b)
            if self.bias is not None:
                router.expert_bias.copy_(torch.tensor(self.bias))
        return router

    def route(self, router: Router, x: Tensor, mask: Tensor) -> Routing:
        with torch.no_grad():
            return router(x, mask, use_bias=self.bias is not None)

    def tau(self, router: Router, x: Tensor) -> Tensor:
        """(T, 1) AdaMoLE threshold, computed as `Router.forward` does."""
        assert router.threshold is not None
        tau_max = self.threshold_max if self.threshold_max is not None else 1.0 / self.E
        xd = x.to(router.dtype)
        w, b = router.threshold.weight.to(router.dtype), router.threshold.bias.to(router.dtype)
        with torch.no_grad():
            return tau_max * torch.sigmoid(F.linear(xd, w, b))

    def scores(self, router: Router, r: Routing) -> Tensor:
        return r.probs + router.expert_bias.to(r.probs.dtype) if self.bias is not None else r.probs


@st.composite
def cases(draw: st.DrawFn, kinds: tuple[str, ...] = KINDS, max_tokens: int = 12) -> Case:
    kind = draw(st.sampled_from(kinds))
    E = draw(st.integers(1, 8))
    T = draw(st.integers(1, max_tokens))
    # narrow values give ties (equal logits), wide ones underflowing probabilities
    value = st.sampled_from([0.0, 1.0, -1.0]) | f32(-30, 30) | f32(-120, 120)
    logits = draw(st.lists(st.lists(value, min_size=E, max_size=E), min_size=T, max_size=T))
    return Case(
        kind=kind,
        logits=logits,
        mask=draw(st.lists(st.booleans(), min_size=T, max_size=T)),
        top_k=draw(st.integers(1, E)),
        top_p=draw(st.floats(0.0, 1.0, exclude_min=True)),
        capacity_factor=draw(st.floats(0.05, 4.0)),
        threshold_max=draw(st.none() | st.floats(0.0, 1.0, exclude_min=True)),
        tau_w=draw(st.lists(f32(-2, 2), min_size=E, max_size=E)),
        tau_b=draw(f32(-5, 5)),
        bias=draw(st.none() | st.lists(f32(-2, 2), min_size=E, max_size=E)),
        dtype=draw(st.sampled_from(["float32", "float64"])),
    )


def loss_values(r: Routing, mask: Tensor, top_k: int) -> dict[str, Tensor]:
    """The balance losses as `MoEModel` computes them from a router's output, plus the standalone forms."""
    return {
        "aux_loss": losses.switch_aux_loss(r.logits, top_k, mask=mask, selected=r.assignment()),
        "aux_loss_topk": losses.switch_aux_loss(r.logits, top_k, mask=mask),
        "z_loss": losses.z_loss(r.logits, mask=mask),
        "importance_loss": losses.importance_loss(r.logits, mask=mask, gates=r.dense_weights()),
        "importance_loss_topk": losses.importance_loss(r.logits, top_k, mask=mask),
        "importance_loss_dense": losses.importance_loss(r.logits, mask=mask),
    }


def stat_values(router: Router, r: Routing, mask: Tensor) -> dict:
    stats.reset(router)
    accumulate_stats(router, r, mask, count_step=False)
    return stats.summarize(router)


def assert_same_stats(a: dict, b: dict, exact: bool) -> None:
    for key in ("tokens", "tokens_per_expert", "dead_experts", "max_entropy"):
        assert a[key] == b[key], key
    for key in ("load_cv", "entropy"):
        if math.isnan(a[key]) or math.isnan(b[key]):
            assert math.isnan(a[key]) and math.isnan(b[key]), key
        elif exact:
            assert a[key] == b[key], key
        else:
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


def assert_same_losses(a: dict[str, Tensor], b: dict[str, Tensor], names: list[str], exact: bool) -> None:
    for name in names:
        if exact:
            assert torch.equal(a[name], b[name]), (name, a[name], b[name])
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def capacity(case: Case) -> int:
    return math.ceil(case.capacity_factor * sum(case.mask) / case.E)


# ------------------------------------------------------------------------------------------ slots
@PROPS
@given(cases())
@example(  # aux-loss-free bias picks an expert whose probability underflowed to 0 (fp32, logit gap 120)
    Case("topk", [[60.0, -60.0]], [True], 1, 0.8, 1.0, None, [0.0, 0.0], 0.0, [0.0, 2.0], "float32")
)
@example(  # the same for topp: the biased best expert alone already reaches top_p
    Case("topp", [[60.0, -60.0]], [True], 1, 0.1, 1.0, None, [0.0, 0.0], 0.0, [0.0, 2.0], "float32")
)
@example(  # boundary: the mass before the second expert is exactly top_p, so it stays out
    Case("topp", [[0.0, 0.0]], [True], 1, 0.5, 1.0, None, [0.0, 0.0], 0.0, None, "float32")
)
@example(  # boundary: p = tau = 0.5 exactly: both experts active (p >= tau), but no excess, nothing routed
    Case("threshold", [[0.0, 0.0]], [True], 1, 0.8, 1.0, 1.0, [0.0, 0.0], 0.0, None, "float32")
)
def test_slots_are_well_formed(case: Case) -> None:
    router = case.router()
    x, mask = case.x(), case.m()
    r = case.route(router, x, mask)
    T, E = case.T, case.E
    K = max_slots(case.kind, case.top_k, E)
    assert r.indices.shape == r.weights.shape == r.active.shape == (T, K)
    assert r.active.dtype == torch.bool
    assert bool(((r.indices >= 0) & (r.indices < E)).all())
    w = r.weights.double()
    assert torch.isfinite(w).all() and bool((w >= 0).all())
    assert bool((w[~r.active] == 0).all()), "an inactive slot has a weight"
    # each expert holds at most one slot of a token
    assert bool((F.one_hot(r.indices, E).sum(1) <= 1).all())
    sums = w.sum(-1)
    scores = case.scores(router, r).double()
    probs = r.probs.double()
    tol = 1e-5 if case.dtype == "float32" else 1e-12
    if case.kind in Router.WEIGHTS_SUM_TO_ONE:
        # every token, padding included (its logits are finite here)
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=tol)
        assert router.weights_sum_to_one
    else:
        assert not router.weights_sum_to_one
    if case.kind == "topk":
        assert bool(r.active.all())
        chosen = F.one_hot(r.indices, E).sum(1).bool()  # (T, E)
        if K < E:  # the k best scores: every chosen score >= every other score
            worst_chosen = scores.masked_fill(~chosen, math.inf).amin(-1)
            best_other = scores.masked_fill(chosen, -math.inf).amax(-1)
            assert bool((worst_chosen >= best_other).all())
    elif case.kind == "topp":
        # slots in descending score order; the active ones are the shortest prefix reaching top_p
        assert bool((scores.gather(-1, r.indices).diff(dim=-1) <= 0).all())
        assert bool(r.active[:, 0].all())
        n_active = r.active.sum(-1)
        assert bool((r.active == (torch.arange(E)[None, :] < n_active[:, None])).all())
        # mass before each slot, in the router's dtype: < top_p on the active slots, >= top_p after them
        p_sorted = r.probs.gather(-1, r.indices)
        mass_before = (p_sorted.cumsum(-1) - p_sorted).double()
        assert bool((mass_before[:, 1:][r.active[:, 1:]] < case.top_p).all())  # slot 0 is always active
        assert bool((mass_before[:, 1:][~r.active[:, 1:]] >= case.top_p).all())
        mass = (probs.gather(-1, r.indices) * r.active).sum(-1)
        assert bool(((mass >= case.top_p - tol) | (n_active == E)).all())
    elif case.kind == "soft":
        assert bool(r.active.all())
        assert torch.equal(r.indices, torch.arange(E).expand(T, E))
        assert torch.equal(r.weights, r.probs)
    elif case.kind == "switch":
        # top-1 with the gate p (not 1); at most `capacity` real tokens per expert, first come first served
        assert torch.equal(r.indices[:, 0], scores.argmax(-1))
        p_chosen = probs.gather(-1, r.indices)[:, 0]
        assert torch.equal(w[:, 0], torch.where(r.active[:, 0], p_chosen, torch.zeros_like(p_chosen)))
        assert not bool(r.active[~mask].any()), "padding took a capacity slot"
        cap = capacity(case)
        for e in range(E):
            wanting = ((r.indices[:, 0] == e) & mask).nonzero()[:, 0]  # in token order
            kept = (r.active[:, 0] & (r.indices[:, 0] == e)).nonzero()[:, 0]
            assert torch.equal(kept, wanting[:cap])
    else:  # threshold (AdaMoLE): experts with score >= tau; nothing routed when none reaches it
        assert case.kind == "threshold"
        assert torch.equal(r.indices, torch.arange(E).expand(T, E))
        tau = case.tau(router, x).double()
        assert torch.equal(r.active, scores >= tau)
        routed = (w > 0).any(-1)
        torch.testing.assert_close(sums[routed], torch.ones_like(sums[routed]), rtol=0, atol=tol)
        assert bool((sums[~routed] == 0).all())
        # a token routes somewhere as soon as some probability strictly exceeds tau on an active slot
        assert torch.equal(routed, ((probs > tau) & r.active).any(-1))
        # weights proportional to p - tau
        excess = torch.where(r.active, (probs - tau).clamp_min(0), torch.zeros_like(probs))
        expect = excess / excess.sum(-1, keepdim=True).clamp_min(1e-300)
        torch.testing.assert_close(w, expect, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------ padding
@PROPS
@given(cases(), st.data())
def test_padding_never_counts(case: Case, data: st.DataObject) -> None:
    router = case.router()
    x, mask = case.x(), case.m()
    r = case.route(router, x, mask)
    ref_losses = loss_values(r, mask, case.top_k)
    ref_stats = stat_values(router, r, mask)
    assert ref_stats["tokens"] == sum(case.mask)
    assert sum(ref_stats["tokens_per_expert"]) == int((r.active & mask[:, None]).sum())
    for name, value in ref_losses.items():
        assert value.shape == () and bool(torch.isfinite(value)), name

    # 1. padding rows hold anything: nothing changes, bit for bit
    junk = x.clone()
    for t in (~mask).nonzero()[:, 0].tolist():
        junk[t] = torch.tensor(data.draw(st.lists(st.sampled_from(JUNK), min_size=case.E, max_size=case.E)))
    rj = case.route(router, junk, mask)
    assert_same_losses(loss_values(rj, mask, case.top_k), ref_losses, list(ref_losses), exact=True)
    assert_same_stats(stat_values(router, rj, mask), ref_stats, exact=True)
    for field in ("indices", "weights", "active"):
        assert torch.equal(getattr(rj, field)[mask], getattr(r, field)[mask]), field

    # 2. padding rows dropped altogether: the same losses, statistics and routing of the real tokens
    rd = case.route(router, x[mask], torch.ones(int(mask.sum()), dtype=torch.bool))
    real = torch.ones(int(mask.sum()), dtype=torch.bool)
    assert_same_losses(loss_values(rd, real, case.top_k), ref_losses, list(ref_losses), exact=False)
    assert_same_stats(stat_values(router, rd, real), ref_stats, exact=False)
    assert torch.equal(rd.indices, r.indices[mask]) and torch.equal(rd.active, r.active[mask])
    torch.testing.assert_close(rd.weights, r.weights[mask], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ token order
@PROPS
@given(cases(), st.data())
def test_token_order_does_not_matter(case: Case, data: st.DataObject) -> None:
    perm = torch.tensor(data.draw(st.permutations(range(case.T))), dtype=torch.long)
    router = case.router()
    x, mask = case.x(), case.m()
    r = case.route(router, x, mask)
    rp = case.route(router, x[perm], mask[perm])
    lo, lp = loss_values(r, mask, case.top_k), loss_values(rp, mask[perm], case.top_k)
    so, sp = stat_values(router, r, mask), stat_values(router, rp, mask[perm])
    assert torch.equal(rp.indices, r.indices[perm])
    assert_same_stats(sp, so, exact=False)
    order_free = ["aux_loss", "aux_loss_topk", "z_loss", "importance_loss_topk", "importance_loss_dense"]
    assert_same_losses(lp, lo, order_free, exact=False)
    overflow = False
    if case.kind == "switch":  # capacity is first come, first served
        wanted = torch.bincount(r.indices[:, 0][mask], minlength=case.E)
        overflow = bool((wanted > capacity(case)).any())
    if not overflow:
        assert torch.equal(rp.active, r.active[perm])
        torch.testing.assert_close(rp.weights, r.weights[perm], rtol=1e-6, atol=1e-7)
        assert_same_losses(lp, lo, ["importance_loss"], exact=False)
    else:  # which tokens overflow may change, how many per expert may not
        kept = torch.bincount(r.indices[:, 0][r.active[:, 0]], minlength=case.E)
        kept_p = torch.bincount(rp.indices[:, 0][rp.active[:, 0]], minlength=case.E)
        assert torch.equal(kept, kept_p) and torch.equal(kept, wanted.clamp_max(capacity(case)))


def test_switch_capacity_depends_on_arrival_order() -> None:
    """The documented exception: two tokens want expert 0 of capacity 1; the first one in order gets it."""
    case = Case(
        "switch", [[2.0, 0.0], [1.0, 0.0]], [True, True], 1, 0.8, 0.5, None, [0.0] * 2, 0.0, None, "float64"
    )
    router = case.router()
    x, mask = case.x(), case.m()
    r = case.route(router, x, mask)
    rp = case.route(router, x.flip(0), mask)
    assert r.active[:, 0].tolist() == [True, False] and rp.active[:, 0].tolist() == [True, False]
    assert not torch.equal(rp.weights, r.weights.flip(0))  # the kept token changed with the order
    torch.testing.assert_close(  # the Switch aux loss only counts slots: unchanged
        losses.switch_aux_loss(rp.logits, 1, selected=rp.assignment()),
        losses.switch_aux_loss(r.logits, 1, selected=r.assignment()),
    )


# ------------------------------------------------------------------------------------------ loss bounds
@st.composite
def logit_batches(draw: st.DrawFn) -> tuple[Tensor, Tensor, int]:
    E = draw(st.integers(1, 8))
    T = draw(st.integers(1, 16))
    value = st.sampled_from([0.0, 1.0]) | f32(-50, 50) | f32(-1000, 1000)
    rows = draw(st.lists(st.lists(value, min_size=E, max_size=E), min_size=T, max_size=T))
    mask = draw(st.lists(st.booleans(), min_size=T, max_size=T).filter(any))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return torch.tensor(rows, dtype=dtype), torch.tensor(mask), draw(st.integers(1, E))


@PROPS
@given(logit_batches(), st.data())
def test_switch_aux_loss_bounds(batch: tuple[Tensor, Tensor, int], data: st.DataObject) -> None:
    """L = E sum_i f_i P_i with f, P distributions over experts, so 0 <= L <= E (E max_i P_i, at most E).

    For top-k chosen from the same logits there is a floor of 1/N (N real tokens): sum_i f_i P_i =
    1/(N k) sum_t sum_{j in S_t} P_j >= 1/(N k) sum_t sum_{j in S_t} p_{t,j} / N >= 1/(N k) * N * (k/E) / N,
    since the k largest of E probabilities hold mass >= k/E. It reaches its balanced value 1 exactly
    when f or P is uniform: k = E (every expert a slot per token), or every real token's logits equal.
    """
    logits, mask, k = batch
    E, N = logits.shape[-1], int(mask.sum())
    tol = 1e-5
    loss = losses.switch_aux_loss(logits, k, mask=mask)
    assert bool(torch.isfinite(loss))
    assert 1.0 / N - tol <= loss.item() <= E + tol
    if k == E:
        assert loss.item() == pytest.approx(1.0, abs=tol)
    flat = torch.full_like(logits, data.draw(f32(-50, 50)))
    assert losses.switch_aux_loss(flat, k, mask=mask).item() == pytest.approx(1.0, abs=tol)
    # any routing actually performed (capacity drops, variable k): still within [0, E]
    selected = torch.tensor(
        data.draw(
            st.lists(st.lists(st.booleans(), min_size=E, max_size=E), min_size=len(mask), max_size=len(mask))
        )
    )
    loss = losses.switch_aux_loss(logits, k, mask=mask, selected=selected)
    assert bool(torch.isfinite(loss)) and -tol <= loss.item() <= E + tol


@PROPS
@given(logit_batches())
def test_z_loss_bounds(batch: tuple[Tensor, Tensor, int]) -> None:
    """max_i z_i <= logsumexp z <= max_i z_i + log E, so (lse)^2 lies between the squares of that
    interval's nearest and farthest points from 0 (the minimum, 0, only where the interval holds 0)."""
    logits, mask, _ = batch
    loss = losses.z_loss(logits, mask=mask)
    assert bool(torch.isfinite(loss)) and loss.item() >= 0
    top = logits[mask].double().amax(-1)
    hi_end = top + math.log(logits.shape[-1])
    nearest = torch.where(
        (top <= 0) & (hi_end >= 0), torch.zeros_like(top), torch.minimum(top.abs(), hi_end.abs())
    )
    farthest = torch.maximum(top.abs(), hi_end.abs())
    value = loss.double().item()
    assert nearest.square().mean().item() * (1 - 1e-5) - 1e-6 <= value
    assert value <= farthest.square().mean().item() * (1 + 1e-5) + 1e-6


@PROPS
@given(logit_batches(), st.booleans())
def test_importance_loss_bounds(batch: tuple[Tensor, Tensor, int], dense: bool) -> None:
    """CV^2 of E nonnegative importances: 0 (balanced) <= L <= E - 1 (all importance on one expert)."""
    logits, mask, k = batch
    E = logits.shape[-1]
    loss = losses.importance_loss(logits, None if dense else k, mask=mask)
    assert bool(torch.isfinite(loss))
    assert -1e-6 <= loss.item() <= (E - 1) * (1 + 1e-5) + 1e-6
    if E == 1:
        assert loss.item() == 0.0
    if dense:  # equal logits: every expert the same importance, the minimum 0
        flat = torch.zeros_like(logits)
        assert losses.importance_loss(flat, mask=mask).item() == pytest.approx(0.0, abs=1e-6)


@PROPS
@given(
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(1, 4),
    st.sampled_from(["expert", "survey"]),
    st.floats(0.05, 2.0),
    st.data(),
)
def test_contrastive_loss_bounds(T: int, E: int, D: int, mode: str, tau: float, data: st.DataObject) -> None:
    """Each InfoNCE term is -log of a softmax probability over at most E candidates whose (smoothed)
    cosines lie in [-1, 1]: 0 <= term <= log(1 + (E - 1) e^{2/tau}); in "expert" mode every term has
    E - 1 negatives, so also term >= log(1 + (E - 1) e^{-2/tau})."""
    outputs = torch.tensor(
        data.draw(st.lists(f32(-10, 10) | st.just(0.0), min_size=T * E * D, max_size=T * E * D)),
        dtype=torch.float64,
    ).reshape(T, E, D)
    active = torch.tensor(data.draw(st.lists(st.booleans(), min_size=T * E, max_size=T * E))).reshape(T, E)
    loss = losses.contrastive_loss(outputs, active, mode=mode, temperature=tau)
    assert bool(torch.isfinite(loss)) and loss.shape == ()
    upper = math.log1p((E - 1) * math.exp(2 / tau))
    assert -1e-9 <= loss.item() <= upper * (1 + 1e-9) + 1e-9
    if mode == "expert" and bool((active.sum(0) >= 2).any()):
        assert loss.item() >= math.log1p((E - 1) * math.exp(-2 / tau)) * (1 - 1e-9) - 1e-9
