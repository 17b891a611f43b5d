"""Asymmetric experts (HydraLoRA, Tian et al. 2024): one A per adapted projection shared by the experts,
a routed B each. The fast paths equal the reference path (float64), the shared A gets the sum of the
gradients its experts would get, a new task block gets its own A, and the adapter saves and reloads."""

from __future__ import annotations

import pytest
import torch

import moetune
from moetune.core.experts import LoRAExperts
from tests.helpers.models import ROUTERS
from tests.helpers.numerics import assert_paths_agree, float64_model, randomize_, run
from tests.helpers.tiny_models import tiny_batch, tiny_model


def banks(model: moetune.MoEModel) -> list[LoRAExperts]:
    return [m for m in model.modules() if isinstance(m, LoRAExperts) and m.num_experts > 1]


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("family,expert_type", [("llama", "ffn"), ("gpt2", "ffn"), ("gpt2", "linear")])
def test_asymmetric_fast_equals_reference(family: str, expert_type: str, router: str) -> None:
    model = float64_model(family, expert_type, router, asymmetric_experts=True, attn_r=2)
    assert banks(model)
    for bank in banks(model):  # one stored A (1, r, d_in), E + shared B's
        assert bank.shared_A and bank.lora_A[0].shape[0] == 1 and bank.lora_B[0].shape[0] == bank.num_experts
    randomize_(model, tie=router in ("topk", "topp"))
    assert_paths_agree(model, tiny_batch(family, batch=3, seq=9, padded=True))


def test_asymmetric_experts_read_one_A_and_its_gradient_is_their_sum() -> None:
    """Every expert's delta is s B_e A x with the one A; dL/dA = sum_e of what a per-expert copy of A
    would receive (the copies built by hand here, in float64)."""
    torch.manual_seed(0)
    bank = LoRAExperts(3, 5, 4, 2, 0.5, shared_A=True, dtype=torch.float64)
    with torch.no_grad():
        bank.lora_B[0].normal_()
    x_TD = torch.randn(6, 5, dtype=torch.float64)
    w_TE = torch.rand(6, 3, dtype=torch.float64)
    bank.dense(x_TD, w_TE).pow(2).sum().backward()
    copies = bank.lora_A[0].detach().expand(3, -1, -1).clone().requires_grad_(True)  # (E, r, d_in)
    by_hand = sum(
        w_TE[:, e, None] * 0.5 * (x_TD @ copies[e].T) @ bank.lora_B[0][e].detach().T for e in range(3)
    )
    by_hand.pow(2).sum().backward()
    torch.testing.assert_close(bank.lora_A[0].grad[0], copies.grad.sum(0), rtol=1e-12, atol=1e-12)
    for e in range(3):
        A, B = bank.expert_weights(e)
        assert A.data_ptr() == bank.lora_A[0].data_ptr() and B.shape == (4, 2)


def test_asymmetric_two_task_blocks_each_have_their_A() -> None:
    model = float64_model("llama", "ffn", "topk", asymmetric_experts=True, num_experts=3, task="A")
    model.add_experts(2, task="B", freeze_existing=True)
    for bank in banks(model):
        assert [tuple(A.shape[:1]) for A in bank.lora_A] == [(1,), (1,)]
        assert [B.shape[0] for B in bank.lora_B] == [3 + 1, 2]  # block 0 holds task A's shared expert
        assert not bank.lora_A[0].requires_grad and bank.lora_A[1].requires_grad
    randomize_(model)
    batch = tiny_batch("llama", batch=3, seq=9, padded=True)
    for p in model.parameters():
        p.requires_grad_(True)  # compare every gradient
    assert_paths_agree(model, batch)
    with model.use_tasks(["B"]):
        assert_paths_agree(model, batch)


def test_asymmetric_adapter_saves_and_reloads(tmp_path) -> None:
    cfg = moetune.MoEConfig(num_experts=4, top_k=2, r=4, asymmetric_experts=True, lora_dropout=0.0)
    model = moetune.get_moe_model(tiny_model("llama"), cfg)
    randomize_(model)
    batch = tiny_batch("llama", batch=2, seq=7)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = moetune.MoEModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    assert loaded.moe_config.asymmetric_experts
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-6, atol=1e-6)
    for bank in banks(model):  # one A (r x d_in), four B (d_out x r)
        assert sum(p.numel() for p in bank.parameters()) == 4 * bank.d_in + 4 * bank.d_out * 4


def test_asymmetric_grouped_path_equals_reference() -> None:
    cfg = moetune.MoEConfig(num_experts=4, r=4, lora_dropout=0.0, asymmetric_experts=True)
    model = moetune.get_moe_model(tiny_model("llama"), cfg)
    randomize_(model)
    model.train()
    model._ctx.options.dispatch = "grouped"
    batch = tiny_batch("llama", batch=3, seq=9, padded=True)
    out, grads = run(model, batch, reference=False)
    ref_out, ref_grads = run(model, batch, reference=True)
    assert grads.keys() == ref_grads.keys() and any(n.endswith("lora_A.0") for n in grads)
    for name in ["logits", *grads]:
        a, b = (out, ref_out) if name == "logits" else (grads[name], ref_grads[name])
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4, name


def test_mixlora_export_refuses_asymmetric_experts(tmp_path) -> None:
    from moetune.interop.mixlora import ConversionError, check_exportable

    with pytest.raises(ConversionError, match="asymmetric_experts"):
        check_exportable(moetune.MoEConfig(asymmetric_experts=True), "adapter")
