"""MoEModel end to end on tiny random models: identity at init, training, freezing, bf16, losses,
statistics, padding, disable_adapter, aux-loss-free bias, per-layer expert counts, modules_to_save."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import PreTrainedModel

import moetune
from moetune.core.experts import LoRAExperts
from moetune.core.layers import LoRALinear, MoEFFN, MoELinear, TrainableCopy
from tests.helpers.models import ROUTERS, base_logits, fresh, inputs, make_cfg
from tests.helpers.tiny_models import tiny_batch

FFN_FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "phi3", "gpt2"]
LINEAR_FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gpt2", "bert"]
FAMILY_TYPES = [(f, "ffn") for f in FFN_FAMILIES] + [(f, "linear") for f in LINEAR_FAMILIES]


def expert_banks(model: moetune.MoEModel) -> list[tuple[str, LoRAExperts]]:
    """Every LoRAExperts of every MoE layer (ffn: one per projection; linear: one per layer)."""
    banks = []
    for name, layer in model.moe_layers():
        if isinstance(layer, MoEFFN):
            banks += [(f"{name}.experts.{p}", bank) for p, bank in layer.experts.items()]
        else:
            banks.append((f"{name}.experts", layer.experts))
    return banks


def randomize_B_(model: moetune.MoEModel, seed: int = 0, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRAExperts):
            for B in module.lora_B:
                B.data = torch.randn(B.shape, generator=g, dtype=B.dtype) * std


def train_steps(model: moetune.MoEModel, batch: dict, steps: int = 2, lr: float = 1e-2) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        model.update_expert_bias()
    model.eval()


def pad_more(batch: dict, extra_cols: int = 3, extra_rows: int = 1) -> dict:
    """Append `extra_cols` right-padding columns and `extra_rows` all-padding rows (attention_mask 0)."""
    B, S = batch["input_ids"].shape
    out = {}
    for k, v in batch.items():
        if k == "labels" and v.dim() == 1:  # sequence classification labels: (B,)
            out[k] = torch.cat([v, v[:extra_rows]])
            continue
        fill = -100 if k == "labels" else 0
        grown = torch.full((B + extra_rows, S + extra_cols), fill, dtype=v.dtype)
        grown[:B, :S] = v
        out[k] = grown
    return out


# ------------------------------------------------------------------------ identity at initialisation

FRESH_CASES = [
    (family, et, router, (i % 3 == 0) * 4, (i % 2) * 1)  # attn_r and num_shared_experts vary over cases
    for i, ((family, et), router) in enumerate((ft, r) for ft in FAMILY_TYPES for r in ROUTERS)
]


@pytest.mark.parametrize(("family", "expert_type", "router", "attn_r", "shared"), FRESH_CASES)
def test_fresh_injection_returns_base_logits(family, expert_type, router, attn_r, shared):
    model = fresh(family)
    batch = inputs(tiny_batch(family))  # the last row is right-padded
    assert batch["attention_mask"].min() == 0
    base = base_logits(family)
    cfg = make_cfg(expert_type=expert_type, router=router, attn_r=attn_r, num_shared_experts=shared)
    moe = moetune.get_moe_model(model, cfg)

    layer_type = MoEFFN if expert_type == "ffn" else MoELinear
    layers = [layer for _, layer in moe.moe_layers()]
    assert layers and all(isinstance(layer, layer_type) for layer in layers)
    assert any(isinstance(m, LoRALinear) for m in moe.modules()) == (attn_r > 0)
    for _, bank in expert_banks(moe):
        assert bank.num_experts == 4 + shared
        assert all(bool((B == 0).all()) for B in bank.lora_B)  # B = 0 at init
        assert all(bool((A != 0).any()) for A in bank.lora_A)  # A random

    with torch.no_grad():
        out = moe(**batch).logits
    assert out.shape == base.shape
    assert (out - base).abs().max() <= 1e-5 * base.abs().max()
    assert moe.aux_losses(), "the MoE layers did not run"

    # the experts are really on the path: nonzero B changes the logits
    randomize_B_(moe)
    with torch.no_grad():
        changed = moe(**batch).logits
    assert (changed - base).abs().max() > 1e-4


# ------------------------------------------------------------------------ one optimizer step

# How every expert gets tokens: 8 x 8 = 64 real tokens with E=4 (topk k=2, topp, switch, threshold
# at init, where all probabilities are near 1/E) - the test asserts `dead_experts == []` before
# checking gradients. BERT's classification loss only reads the [CLS] token in the last layer, so
# its case uses `soft` routing (every expert takes every token).
STEP_CASES = [
    ("llama", "ffn", "topk", 1, 4),
    ("phi3", "ffn", "soft", 0, 0),
    ("gpt2", "ffn", "switch", 0, 0),
    ("gemma", "ffn", "topp", 1, 0),
    ("qwen2", "ffn", "threshold", 0, 4),
    ("gpt2", "linear", "topk", 1, 4),
    ("mistral", "linear", "threshold", 0, 0),
    ("bert", "linear", "soft", 1, 4),
]


@pytest.mark.parametrize(("family", "expert_type", "router", "shared", "attn_r"), STEP_CASES)
def test_one_step_trains_every_expert_and_router(family, expert_type, router, shared, attn_r):
    model = fresh(family)
    batch = tiny_batch(family, batch=8, seq=8, padded=False)
    cfg = make_cfg(expert_type=expert_type, router=router, num_shared_experts=shared, attn_r=attn_r)
    moe = moetune.get_moe_model(model, cfg)
    with torch.no_grad():
        before = moe(**inputs(batch)).logits
    moe.reset_routing_stats()

    moe.train()
    out = moe(**batch)
    for name, st in moe.routing_stats().items():
        assert st["dead_experts"] == [], f"{name}: an expert got no token, the test batch is too small"
    out.loss.backward()

    for name, bank in expert_banks(moe):  # routed and shared experts
        for B in bank.lora_B:
            assert B.grad is not None, name
            per_expert = B.grad.flatten(1).abs().amax(1)
            assert bool((per_expert > 0).all()), f"{name}: experts without gradient {per_expert.tolist()}"
    for name, layer in moe.moe_layers():
        # B = 0 here, so this gradient comes from the aux and z losses
        g = layer.router.weight_blocks[0].grad
        assert g is not None and bool(g.abs().max() > 0), f"{name}: router got no gradient"
    for m in moe.modules():
        if isinstance(m, LoRALinear):
            assert bool(m.lora.lora_B[0].grad.abs().max() > 0)

    opt = torch.optim.AdamW([p for p in moe.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    moe.eval()
    with torch.no_grad():
        after = moe(**inputs(batch)).logits
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
def test_router_gets_gradient_through_combine_weights(expert_type, router):
    """With all balance losses off, the task loss alone reaches the router once the experts differ."""
    moe = moetune.get_moe_model(
        fresh("llama"),
        make_cfg(expert_type=expert_type, router=router, aux_loss_coef=0.0, z_loss_coef=0.0),
    )
    randomize_B_(moe)
    moe.train()
    moe(**tiny_batch("llama", batch=4, seq=8)).loss.backward()
    for name, layer in moe.moe_layers():
        g = layer.router.weight_blocks[0].grad
        assert g is not None and bool(g.abs().max() > 0), f"{name}: router got no gradient"


# ------------------------------------------------------------------------ what is trainable

TRAINABLE_PARTS = (".experts.", ".router.", ".lora.", ".trained.")


@pytest.mark.parametrize(
    ("family", "cfg_kw"),
    [
        ("llama", dict(router="threshold", attn_r=4, num_shared_experts=1, modules_to_save=["lm_head"])),
        ("gpt2", dict(expert_type="linear", attn_r=2)),
        ("bert", dict(expert_type="linear", attn_r=2, modules_to_save=["classifier"])),
    ],
)
def test_only_adapter_parameters_are_trainable(family, cfg_kw):
    moe = moetune.get_moe_model(fresh(family), make_cfg(**cfg_kw))
    adapter_names = [name for name, _ in moe.adapter_modules()]
    trainable, frozen = set(), set()
    for name, p in moe.named_parameters():
        (trainable if p.requires_grad else frozen).add(name)
        inner = name.removeprefix("base_model.")
        in_adapter = any(inner.startswith(a + ".") for a in adapter_names)
        is_base = ".base_layer." in name or ".original." in name or not in_adapter
        if is_base:
            assert not p.requires_grad, f"base weight {name} is trainable"
        else:
            assert any(part in name for part in TRAINABLE_PARTS), name
            assert p.requires_grad, f"adapter weight {name} is frozen"
    kinds = {part for part in TRAINABLE_PARTS for n in trainable if part in n}
    expected = {".experts.", ".router."}
    expected |= {".lora."} if cfg_kw.get("attn_r") else set()
    expected |= {".trained."} if cfg_kw.get("modules_to_save") else set()
    assert kinds == expected
    assert frozen, "the base model has no frozen weight?"
    n_trainable, _ = moe.get_nb_trainable_parameters()
    assert n_trainable == sum(p.numel() for n, p in moe.named_parameters() if n in trainable)


# ------------------------------------------------------------------------ bf16 base


@pytest.mark.parametrize(("family", "expert_type"), [("llama", "ffn"), ("phi3", "ffn"), ("gpt2", "linear")])
def test_bf16_base_model(family, expert_type):
    model = fresh(family, torch.bfloat16)
    batch = tiny_batch(family)
    with torch.no_grad():
        base = model(**inputs(batch)).logits
    moe = moetune.get_moe_model(model, make_cfg(expert_type=expert_type, attn_r=2))
    for _, bank in expert_banks(moe):
        assert all(p.dtype == torch.float32 for p in [*bank.lora_A, *bank.lora_B])
    for _, layer in moe.moe_layers():
        assert layer.router.weight.dtype == torch.float32

    seen = []
    hooks = [
        layer.router.register_forward_hook(lambda m, a, r: seen.append(r)) for _, layer in moe.moe_layers()
    ]
    moe.train()
    out = moe(**batch)
    for h in hooks:
        h.remove()
    assert seen and all(r.logits.dtype == torch.float32 and r.probs.dtype == torch.float32 for r in seen)
    assert all(v.dtype == torch.float32 for v in moe.aux_losses().values())
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits.float(), base.float(), rtol=1e-2, atol=1e-2)
    out.loss.backward()
    for name, bank in expert_banks(moe):
        g = bank.lora_B[0].grad
        assert g is not None and g.dtype == torch.float32 and bool(g.isfinite().all()), name
        assert bool(g.abs().max() > 0), name

    # the router called directly on a bf16 input computes in float32
    _, layer = next(moe.moe_layers())
    x = torch.randn(5, layer.router.weight.shape[1], dtype=torch.bfloat16)
    routing = layer.router(x, torch.ones(5, dtype=torch.bool))
    assert routing.logits.dtype == torch.float32 and routing.probs.dtype == torch.float32


# ------------------------------------------------------------------------ out.loss and aux_losses

COEFS = {
    "aux_loss": "aux_loss_coef",
    "z_loss": "z_loss_coef",
    "importance_loss": "importance_loss_coef",
    "contrastive_loss": "contrastive_loss_coef",
}


@pytest.mark.parametrize(
    ("family", "expert_type"), [("llama", "ffn"), ("gpt2", "linear"), ("bert", "linear")]
)
def test_loss_is_task_loss_plus_weighted_balance_losses(family, expert_type):
    cfg = make_cfg(
        expert_type=expert_type,
        aux_loss_coef=0.1,
        z_loss_coef=0.01,
        importance_loss_coef=0.05,
        contrastive_loss_coef=0.02,
    )
    moe = moetune.get_moe_model(fresh(family), cfg)
    batch = tiny_batch(family)
    moe.train()  # the contrastive loss is computed in training only
    out = moe(**batch)
    aux = moe.aux_losses()
    assert set(aux) == set(COEFS)
    assert all(v.dim() == 0 and bool(v.isfinite()) for v in aux.values())
    with moe.disable_adapter():
        task = moe(**batch).loss
    weighted = sum(getattr(cfg, COEFS[k]) * v for k, v in aux.items())
    assert float(weighted.detach()) > 1e-3
    torch.testing.assert_close(out.loss, task + weighted, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moe.weighted_aux_loss(), weighted, rtol=1e-6, atol=1e-7)
    # out.loss is differentiable w.r.t. the routers through the balance losses
    out.loss.backward()
    assert bool(next(moe.moe_layers())[1].router.weight_blocks[0].grad.abs().max() > 0)


def test_no_labels_no_loss_but_aux_losses_filled():
    moe = moetune.get_moe_model(fresh("llama"), make_cfg())
    assert moe.aux_losses() == {}
    out = moe(**inputs(tiny_batch("llama")))
    assert out.loss is None
    aux = moe.aux_losses()
    assert {"aux_loss", "z_loss"} <= set(aux)
    assert all(bool(v.isfinite()) for v in aux.values())
    assert aux["aux_loss"] > 0.5  # about 1 for near-balanced routing
    # aux_losses() is the last forward's: another batch gives other values
    moe(**inputs(tiny_batch("llama", seed=3)))
    assert float(moe.aux_losses()["z_loss"].detach()) != float(aux["z_loss"].detach())


# ------------------------------------------------------------------------ routing statistics


@pytest.mark.parametrize(
    ("family", "expert_type", "router"),
    [
        ("llama", "ffn", "topk"),
        ("gpt2", "linear", "topk"),
        ("qwen2", "ffn", "topp"),
        ("gemma", "ffn", "switch"),
    ],
)
def test_routing_stats_exclude_padding_and_are_consistent(family, expert_type, router):
    moe = moetune.get_moe_model(fresh(family), make_cfg(expert_type=expert_type, router=router, top_k=2))
    batch = inputs(tiny_batch(family, batch=3, seq=9))
    real = int(batch["attention_mask"].sum())
    assert real < batch["attention_mask"].numel()
    with torch.no_grad():
        moe(**batch)
        moe(**batch)
    stats = moe.routing_stats()
    assert set(stats) == {name for name, _ in moe.moe_layers()}
    for name, st in stats.items():
        tpe = st["tokens_per_expert"]
        assert st["tokens"] == 2 * real, name
        assert len(tpe) == 4
        if router == "topk":
            assert sum(tpe) == 2 * 2 * real, name  # k slots per real token
        elif router == "topp":
            assert 2 * real <= sum(tpe) <= 2 * 4 * real
        else:  # switch: at most one slot per real token (capacity drops)
            assert sum(tpe) <= 2 * real
        counts = torch.tensor(tpe, dtype=torch.float64)
        assert st["load_cv"] == pytest.approx(float(counts.std(unbiased=False) / counts.mean()), abs=1e-9)
        assert st["dead_experts"] == [i for i, c in enumerate(tpe) if c == 0]
        assert 0.0 < st["entropy"] <= st["max_entropy"] + 1e-9
        assert st["max_entropy"] == pytest.approx(math.log(4))
    moe.reset_routing_stats()
    for st in moe.routing_stats().values():
        assert st["tokens"] == 0 and st["tokens_per_expert"] == [0, 0, 0, 0]
        assert st["load_cv"] == 0.0 and st["dead_experts"] == []


def test_effective_experts_by_hand():
    """exp(entropy) of normalised combine weights per token; of the load shares per layer."""
    from moetune.core.stats import effective_experts, effective_load

    w_TE = torch.tensor(
        [[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.3, 0.0, 0.0]],
        dtype=torch.float64,
    )
    p = torch.tensor([0.25, 0.75], dtype=torch.float64)
    expected = [2.0, 1.0, 0.0, math.exp(-(p * p.log()).sum().item())]  # 0.1, 0.3 renormalised
    assert effective_experts(w_TE).tolist() == pytest.approx(expected, abs=1e-12)
    assert effective_load(torch.tensor([5.0, 5.0, 5.0, 5.0])) == pytest.approx(4.0)
    assert effective_load(torch.tensor([7.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_load(torch.tensor([0.0, 0.0])) == 0.0
    shares = torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64)
    assert effective_load(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(
        math.exp(-(shares * shares.log()).sum())
    )


@pytest.mark.parametrize("router", ["topk", "soft", "switch"])
def test_routing_stats_effective_experts(router):
    """Over real tokens only: the mean of exp(H(combine weights)) from the routing the layer used, and
    exp(H(load shares)) from the counted slots; between 1 and k (top-k), at most E (soft)."""
    from moetune.core.stats import effective_experts, effective_load

    moe = moetune.get_moe_model(fresh("llama"), make_cfg(router=router, top_k=2))
    batch = inputs(tiny_batch("llama", batch=3, seq=9))
    mask_T = batch["attention_mask"].reshape(-1).bool()
    seen = {}
    for name, layer in moe.moe_layers():
        layer.router.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out))
    with torch.no_grad():
        moe(**batch)
    for name, st in moe.routing_stats().items():
        expected = effective_experts(seen[name].dense_weights())[mask_T].mean().item()
        assert st["effective_experts"] == pytest.approx(expected, rel=1e-9), name
        assert st["effective_load"] == pytest.approx(effective_load(torch.tensor(st["tokens_per_expert"])))
        assert 1.0 <= st["effective_load"] <= 4.0 + 1e-9
        if router == "topk":
            assert 1.0 < st["effective_experts"] <= 2.0 + 1e-9
        elif router == "soft":
            assert 2.0 < st["effective_experts"] <= 4.0 + 1e-9
        else:  # switch: one expert per token that fits, 0 for those that overflow
            assert 0.0 < st["effective_experts"] <= 1.0 + 1e-9
    moe.reset_routing_stats()
    assert all(math.isnan(st["effective_experts"]) for st in moe.routing_stats().values())


def test_routing_stats_report_dead_experts():
    """A selection bias of +10 on experts 0 and 1 sends every token there: experts 2 and 3 are dead."""
    moe = moetune.get_moe_model(fresh("llama"), make_cfg(bias_update_rate=0.01))
    for _, layer in moe.moe_layers():
        layer.router.expert_bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))
    batch = inputs(tiny_batch("llama"))
    real = int(batch["attention_mask"].sum())
    with torch.no_grad():
        moe(**batch)
    for name, st in moe.routing_stats().items():
        assert st["tokens_per_expert"] == [real, real, 0, 0], name
        assert st["dead_experts"] == [2, 3]
        assert st["load_cv"] == pytest.approx(1.0)


# ------------------------------------------------------------------------ padding changes nothing

PAD_CASES = [
    ("llama", "ffn", "topk"),
    ("gemma2", "ffn", "switch"),
    ("phi3", "ffn", "threshold"),
    ("mistral", "ffn", "topp"),
    ("gpt2", "linear", "topp"),
    ("qwen2", "linear", "switch"),
    ("bert", "linear", "topk"),
]


@pytest.mark.parametrize(("family", "expert_type", "router"), PAD_CASES)
def test_extra_padding_changes_neither_losses_nor_real_logits(family, expert_type, router):
    cfg = make_cfg(expert_type=expert_type, router=router, importance_loss_coef=0.1, num_shared_experts=1)
    moe = moetune.get_moe_model(fresh(family), cfg)
    randomize_B_(moe)  # experts matter
    batch = inputs(tiny_batch(family))
    padded = pad_more(batch)
    with torch.no_grad():
        out1 = moe(**batch).logits
        aux1 = moe.aux_losses()
        stats1 = moe.routing_stats()
        moe.reset_routing_stats()
        out2 = moe(**padded).logits
        aux2 = moe.aux_losses()
        stats2 = moe.routing_stats()
    assert set(aux1) == set(aux2)
    for k in aux1:
        assert abs(float(aux1[k]) - float(aux2[k])) <= 1e-6, k
    for name in stats1:
        for key in ("entropy", "effective_experts"):  # float sums over other token sets: not bitwise
            e1, e2 = stats1[name].pop(key), stats2[name].pop(key)
            assert e1 == pytest.approx(e2, abs=1e-6), (name, key)
        assert stats1[name] == stats2[name], name
    B, S = batch["input_ids"].shape
    if family == "bert":  # sequence classification: one row of logits per sample
        torch.testing.assert_close(out2[:B], out1, rtol=1e-5, atol=1e-5)
    else:
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(out2[:B, :S][real], out1[real], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ disable_adapter


@pytest.mark.parametrize(
    ("family", "cfg_kw"),
    [
        ("llama", dict(attn_r=2, num_shared_experts=1, modules_to_save=["lm_head"])),
        ("gpt2", dict(expert_type="linear", router="switch", attn_r=2)),
        ("bert", dict(expert_type="linear", modules_to_save=["classifier"])),
    ],
)
def test_disable_adapter_after_training_is_the_base(family, cfg_kw):
    batch = tiny_batch(family)
    base = base_logits(family)  # an untouched copy of the same model
    model = fresh(family)
    moe = moetune.get_moe_model(model, make_cfg(**cfg_kw))
    assert moe.get_base_model() is model and isinstance(moe.get_base_model(), PreTrainedModel)
    train_steps(moe, batch)
    with torch.no_grad():
        adapted = moe(**inputs(batch)).logits
        assert (adapted - base).abs().max() > 1e-4
        with moe.disable_adapter():
            disabled = moe(**inputs(batch)).logits
        again = moe(**inputs(batch)).logits
    assert torch.equal(disabled, base)
    assert torch.equal(again, adapted)


# ------------------------------------------------------------------------ aux-loss-free balancing


@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
def test_update_expert_bias_moves_toward_balance(expert_type):
    rate = 0.05
    moe = moetune.get_moe_model(
        fresh("llama"), make_cfg(expert_type=expert_type, top_k=1, bias_update_rate=rate)
    )
    batch = inputs(tiny_batch("llama", batch=4, seq=8))
    real = int(batch["attention_mask"].sum())
    with torch.no_grad():
        moe.eval()
        moe(**batch)  # eval forwards do not count
        for _, layer in moe.moe_layers():
            assert float(layer.router.step_counts.sum()) == 0
        moe.train()
        moe(**batch)
    counts = {name: layer.router.step_counts.clone() for name, layer in moe.moe_layers()}
    for name, c in counts.items():
        assert float(c.sum()) == real, name  # top-1 of the real tokens only
    assert any(float(c.max() - c.min()) > 0 for c in counts.values())

    moe.update_expert_bias()
    for name, layer in moe.moe_layers():
        c, bias = counts[name], layer.router.expert_bias
        expected = rate * torch.sign(c.mean() - c)
        torch.testing.assert_close(bias, expected.to(bias.dtype))
        assert bool((bias[c > c.mean()] < 0).all()) and bool((bias[c < c.mean()] > 0).all())
        assert float(layer.router.step_counts.abs().sum()) == 0  # reset

    # a second step accumulates from the current bias; eval forwards still do not count
    moe.eval()
    with torch.no_grad():
        moe(**batch)
    first = {name: layer.router.expert_bias.clone() for name, layer in moe.moe_layers()}
    moe.update_expert_bias()
    for name, layer in moe.moe_layers():
        torch.testing.assert_close(layer.router.expert_bias, first[name])  # no counts: sign(0) = 0


def test_expert_bias_changes_selection_not_weights():
    moe = moetune.get_moe_model(fresh("llama"), make_cfg(top_k=2, bias_update_rate=0.01))
    _, layer = next(moe.moe_layers())
    router = layer.router
    x = torch.randn(16, router.weight.shape[1])
    mask = torch.ones(16, dtype=torch.bool)
    router.expert_bias.copy_(torch.tensor([0.0, 5.0, 0.0, 5.0]))
    routing = router(x, mask, use_bias=True)
    assert sorted(set(routing.indices.flatten().tolist())) == [1, 3]
    p = routing.probs.gather(-1, routing.indices)
    torch.testing.assert_close(routing.weights, p / p.sum(-1, keepdim=True))
    torch.testing.assert_close(routing.probs, routing.logits.softmax(-1))


# ------------------------------------------------------------------------ per-layer expert counts


@pytest.mark.parametrize(
    ("family", "expert_type"), [("llama", "ffn"), ("gpt2", "linear"), ("bert", "linear")]
)
def test_per_layer_expert_counts(family, expert_type):
    moe = moetune.get_moe_model(
        fresh(family), make_cfg(expert_type=expert_type, num_experts=[2, 4], top_k=2, num_shared_experts=1)
    )
    per_layer = {0: set(), 1: set()}
    for name, layer in moe.moe_layers():
        layer_idx = 0 if ".0." in name else 1
        per_layer[layer_idx].add(layer.router.num_experts)
        assert layer.router.weight.shape[0] == layer.router.num_experts
        assert layer.router.expert_bias.shape == (layer.router.num_experts,)
    assert per_layer == {0: {2}, 1: {4}}
    for name, bank in expert_banks(moe):
        assert bank.num_experts == (2 if ".0." in name else 4) + 1, name
    with torch.no_grad():
        moe(**inputs(tiny_batch(family)))
    for name, st in moe.routing_stats().items():
        assert len(st["tokens_per_expert"]) == (2 if ".0." in name else 4), name


# ------------------------------------------------------------------------ modules_to_save


@pytest.mark.parametrize(
    ("family", "module"), [("llama", "lm_head"), ("bert", "classifier"), ("gpt2", "lm_head")]
)
def test_modules_to_save_trains_a_copy(family, module):
    base_model = fresh(family)
    original_weight = base_model.get_submodule(module).weight.detach().clone()
    moe = moetune.get_moe_model(base_model, make_cfg(expert_type="linear", modules_to_save=[module]))
    wrapped = base_model.get_submodule(module)
    assert isinstance(wrapped, TrainableCopy)
    assert wrapped.trained.weight.requires_grad and not wrapped.original.weight.requires_grad
    assert wrapped.trained.weight.data_ptr() != wrapped.original.weight.data_ptr()
    train_steps(moe, tiny_batch(family), steps=2)
    assert torch.equal(wrapped.original.weight, original_weight)
    assert not torch.equal(wrapped.trained.weight, original_weight)
    batch = inputs(tiny_batch(family))
    base = base_logits(family)
    with torch.no_grad(), moe.disable_adapter():
        assert torch.equal(moe(**batch).logits, base)
