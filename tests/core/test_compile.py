"""torch.compile: a moetune model traces into one graph per forward (the only break is the finiteness
check after the base model, which reads one flag to the host), and the compiled model computes what
the eager one does: logits, balance losses and every gradient; MoETrainer with `torch_compile=True`
trains as eager. Backend "aot_eager" traces forward and backward as inductor would, without
generating code (fast enough for the suite)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

import moetune
from tests.helpers.numerics import randomize_
from tests.helpers.tiny_models import tiny_batch, tiny_model


def _model(expert_type: str) -> moetune.MoEModel:
    cfg = moetune.MoEConfig(expert_type=expert_type, num_experts=4, top_k=2, r=8, lora_dropout=0.0, attn_r=4)
    model = moetune.get_moe_model(tiny_model("llama"), cfg)
    randomize_(model)
    return model


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_breaks_only_at_the_finiteness_check(training: bool) -> None:
    model = _model("ffn").train(training)
    dynamo.reset()
    with torch.set_grad_enabled(training):
        explained = dynamo.explain(model)(**tiny_batch("llama"))
    assert explained.graph_break_count >= 1  # the check reads a flag: it must not be traced away
    for reason in explained.break_reasons:
        assert reason.user_stack[-1].name == "nonfinite_problem", reason  # core.balance: one host sync


@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
def test_compiled_step_equals_eager(expert_type: str) -> None:
    batch = tiny_batch("llama")
    results = []
    for compiled in (False, True):
        model = _model(expert_type).train()
        dynamo.reset()
        run = torch.compile(model, backend="aot_eager") if compiled else model
        out = run(**batch)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), out.loss.detach(), model.aux_losses(), grads))
    (logits, loss, aux, grads), (c_logits, c_loss, c_aux, c_grads) = results
    torch.testing.assert_close(c_logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    assert c_aux.keys() == aux.keys() and all(torch.allclose(c_aux[k], aux[k], atol=1e-6) for k in aux)
    assert c_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(c_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().max() > 0 for g in grads.values())


def test_trainer_torch_compile_trains_as_eager(tmp_path) -> None:
    """`TrainingArguments(torch_compile=True)`: MoETrainer trains the compiled model (its balance-loss
    logs, bias updates and router group included) to the adapter the eager run reaches."""
    from tests.helpers.models import snapshot, trainer

    runs = {}
    for compiled in (False, True):
        dynamo.reset()
        kwargs = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        moe = dict(router_jitter=0.0, lora_dropout=0.0)  # no randomness that could differ between runs
        t = trainer(str(tmp_path / str(compiled)), max_steps=4, moe=moe, save_strategy="no", **kwargs)
        init = snapshot(t)
        t.train()
        logs = [log for log in t.state.log_history if "loss" in log]
        runs[compiled] = (logs, snapshot(t), type(t.model_wrapped).__name__)
    (logs, adapter, _), (c_logs, c_adapter, c_wrapped) = runs[False], runs[True]
    assert c_wrapped == "OptimizedModule"
    for key in ("loss", "moe/aux_loss", "moe/z_loss", "moe/importance_loss"):
        assert [log[key] for log in c_logs] == pytest.approx([log[key] for log in logs], rel=1e-5), key
    assert max(float((c_adapter[k] - adapter[k]).abs().max()) for k in adapter) < 1e-4
    assert max(float((adapter[k] - v).abs().max()) for k, v in init.items()) > 1e-3  # it did train
