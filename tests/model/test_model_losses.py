"""Balance losses wired into the model: which are computed, and that they reach the parameters."""

from __future__ import annotations

import pytest
import torch

import moetune
from moetune.core.experts import LoRAExperts
from tests.helpers.tiny_models import tiny_batch, tiny_model


@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
@pytest.mark.parametrize("mode", ["expert", "survey"])
def test_contrastive_loss_trains_every_expert(expert_type: str, mode: str) -> None:
    cfg = moetune.MoEConfig(
        expert_type=expert_type,
        num_experts=4,
        contrastive_loss_coef=0.1,
        contrastive_mode=mode,
        contrastive_sample=8,
        lora_dropout=0.0,
    )
    model = moetune.get_moe_model(tiny_model("llama"), cfg)
    for module in model.modules():
        if isinstance(module, LoRAExperts):
            for B in module.lora_B:
                B.data.normal_()
    model.train()
    model(**tiny_batch("llama"))
    aux = model.aux_losses()
    assert set(aux) == {"aux_loss", "z_loss", "importance_loss", "contrastive_loss"}
    aux["contrastive_loss"].backward()
    for name, p in model.named_parameters():
        if "lora_B" in name:  # every expert's B (all experts' outputs enter the loss)
            assert p.grad is not None and (p.grad.flatten(1).abs().sum(1) > 0).all(), name


def test_contrastive_only_in_training() -> None:
    cfg = moetune.MoEConfig(num_experts=4, contrastive_loss_coef=0.1)
    model = moetune.get_moe_model(tiny_model("llama"), cfg).eval()
    model(**tiny_batch("llama"))
    assert "contrastive_loss" not in model.aux_losses()


def test_weighted_aux_loss_uses_coefficients() -> None:
    cfg = moetune.MoEConfig(num_experts=4, aux_loss_coef=0.5, z_loss_coef=0.25, importance_loss_coef=2.0)
    model = moetune.get_moe_model(tiny_model("llama"), cfg)
    model(**tiny_batch("llama"))
    aux = model.aux_losses()
    expected = 0.5 * aux["aux_loss"] + 0.25 * aux["z_loss"] + 2.0 * aux["importance_loss"]
    torch.testing.assert_close(model.weighted_aux_loss(), expected)


def test_losses_average_over_routers() -> None:
    """aux_losses() is the mean over the layers' routers of each loss, from their own logits."""
    cfg = moetune.MoEConfig(num_experts=4, top_k=2)
    model = moetune.get_moe_model(tiny_model("llama"), cfg)
    seen = {}
    for name, layer in model.moe_layers():
        layer.router.register_forward_hook(lambda mod, args, out, n=name: seen.__setitem__(n, (out, args[1])))
    model(**tiny_batch("llama"))
    z = torch.stack([moetune.core.losses.z_loss(r.logits, mask=m) for r, m in seen.values()]).mean()
    aux = torch.stack(
        [moetune.core.losses.switch_aux_loss(r.logits, 2, mask=m) for r, m in seen.values()]
    ).mean()
    assert len(seen) == 2
    torch.testing.assert_close(model.aux_losses()["z_loss"], z)
    torch.testing.assert_close(model.aux_losses()["aux_loss"], aux)


def test_nonfinite_router_input_names_the_layer() -> None:
    model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(num_experts=4))
    # NaN in layer 1's attention norm: layer 0's router sees finite input, layer 1's does not
    model.get_base_model().model.layers[1].input_layernorm.weight.data[0] = float("nan")
    with pytest.raises(
        FloatingPointError, match=r"layers\.1\.mlp: the router's weights are finite, so the input"
    ):
        model(**tiny_batch("llama"))


def test_nonfinite_router_weight_is_named_not_the_input() -> None:
    model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(num_experts=4))
    router = dict(model.moe_layers())["model.layers.1.mlp"].router
    router.weight_blocks[0].data[2, 0] = float("nan")  # the input stays finite
    with pytest.raises(
        FloatingPointError, match=r"layers\.1\.mlp: its router's weight_blocks\.0 hold NaN/inf"
    ):
        model(**tiny_batch("llama"))


def test_inference_forward_computes_balance_losses_only_when_asked(monkeypatch) -> None:
    """Without autograd and labels (inference, generation) the balance losses wait for `aux_losses` /
    `weighted_aux_loss`, and are then those of that forward; with labels or autograd they come at once."""
    import moetune.core.losses as losses_module

    cfg = moetune.MoEConfig(num_experts=4, importance_loss_coef=0.3)
    model = moetune.get_moe_model(tiny_model("llama"), cfg)
    batch = tiny_batch("llama")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    expected = (model(**inputs).logits, model.aux_losses(), model.weighted_aux_loss())  # with autograd
    calls = []
    real = losses_module.balance_losses

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(losses_module, "balance_losses", counted)
    layers = len(list(model.moe_layers()))
    with torch.no_grad():
        logits = model(**inputs).logits
        assert calls == []  # nothing computed yet
        aux = model.aux_losses()
        assert len(calls) == layers
        weighted = model.weighted_aux_loss()
        assert len(calls) == layers  # computed once
        model(**batch)  # labels: the loss needs them now
        assert len(calls) == 2 * layers
    torch.testing.assert_close(logits, expected[0].detach())
    assert aux.keys() == expected[1].keys()
    # the no-grad forward takes the inference expert paths: equal within float32 rounding, not bitwise
    for name in aux:
        torch.testing.assert_close(aux[name], expected[1][name].detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(weighted, expected[2].detach(), rtol=1e-6, atol=1e-8)
