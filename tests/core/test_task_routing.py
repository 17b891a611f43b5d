"""Task routing (`task_routing`, MOELoRA): the router reads a learned per-task embedding, alone ("task",
MOELoRA, Liu et al. 2023: a fixed mixture per task) or added to the token ("token+task")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moetune
from moetune.core.routing import Router
from tests.helpers.models import ROUTERS
from tests.helpers.tiny_models import tiny_batch, tiny_model

BASE = dict(task="A", extra_tasks=["B", "C"], num_experts=4, top_k=2, r=4, lora_dropout=0.0)


def make(task_routing: str, expert_type: str = "ffn", arch: str = "llama", **overrides) -> moetune.MoEModel:
    torch.manual_seed(0)
    cfg = moetune.MoEConfig(**(BASE | {"task_routing": task_routing, "expert_type": expert_type} | overrides))
    model = moetune.get_moe_model(tiny_model(arch), cfg)
    with torch.no_grad():  # trained-looking experts and task embeddings (B = 0 at init gives no signal)
        for name, p in model.named_parameters():
            if "lora_B" in name or "task_embedding" in name:
                p.normal_(0, 0.5)
    return model.eval()


def logits(model: moetune.MoEModel, batch: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits


def router_logits(model: moetune.MoEModel, batch: dict, **kwargs) -> list[torch.Tensor]:
    """The (T, E) logits of each router in one forward (a forward hook, removed right after)."""
    seen: list[torch.Tensor] = []
    handles = [
        layer.router.register_forward_hook(lambda _m, _args, out: seen.append(out.logits.detach().clone()))
        for _, layer in model.moe_layers()
    ]
    try:
        logits(model, batch, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


# ---- the router's formula, by hand -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["task", "token+task"])
def test_router_logits_by_hand(mode: str) -> None:
    torch.manual_seed(1)
    router = Router(16, 4, kind="topk", top_k=2, task_routing=mode, num_tasks=3, router_dtype="float64")
    with torch.no_grad():
        router.task_embedding_blocks[0].normal_()
    x = torch.randn(5, 16, dtype=torch.float64)
    mask = torch.ones(5, dtype=torch.bool)
    for task in range(3):
        e = router.task_embedding_blocks[0][task].detach()
        expected_input = e.expand(5, 16) if mode == "task" else x + e
        routing = router(x, mask, task=task)
        torch.testing.assert_close(
            routing.logits, expected_input @ router.weight.detach().T, rtol=0, atol=1e-12
        )
        torch.testing.assert_close(routing.probs, F.softmax(routing.logits, -1))
        if mode == "task":  # a fixed mixture per task: every token routed alike
            assert torch.equal(routing.indices, routing.indices[:1].expand(5, -1))
            assert torch.equal(routing.weights, routing.weights[:1].expand(5, -1))


def test_embeddings_start_as_documented() -> None:
    task_router = Router(8, 4, task_routing="task", num_tasks=3)
    token_router = Router(8, 4, task_routing="token+task", num_tasks=3)
    assert task_router.task_embedding_blocks[0].shape == (3, 8)
    assert task_router.task_embedding_blocks[0].std() > 0.3  # N(0, 1): tasks start apart
    assert torch.count_nonzero(token_router.task_embedding_blocks[0]) == 0  # token routing to begin with
    assert len(Router(8, 4).task_embedding_blocks) == 0  # no embedding without task routing


def test_token_plus_task_starts_as_token_routing() -> None:
    """Zero embeddings: the same weights with task_routing 'none' give bitwise the same logits."""
    plain = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(**BASE)).eval()
    routed = make("token+task")
    with torch.no_grad():
        for _, layer in routed.moe_layers():
            layer.router.task_embedding_blocks[0].zero_()  # as at injection
    routed_params = dict(routed.named_parameters())
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.copy_(routed_params[name])
    batch = tiny_batch("llama", batch=2, seq=6)
    for task in ("A", "B"):
        assert torch.equal(logits(plain, batch), logits(routed, batch, task_ids=[task, task]))


# ---- model level -----------------------------------------------------------------------------------
@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
def test_task_mode_is_a_fixed_mixture_per_task(expert_type: str) -> None:
    model = make("task", expert_type)
    batch = tiny_batch("llama", batch=3, seq=7)
    seen = router_logits(model, batch, task_ids=torch.tensor([1, 1, 1]))
    assert len(seen) == len(list(model.moe_layers()))
    for logits_TE in seen:  # every token routed by task B's embedding alone
        assert torch.equal(logits_TE, logits_TE[:1].expand_as(logits_TE))
    routers = [layer.router for _, layer in model.moe_layers()]
    for router in routers:
        e = router.task_embedding(1)
        mixture = router(e[None], torch.ones(1, dtype=torch.bool), task=1)
        manual = F.softmax(F.linear(e, router.weight), -1)
        torch.testing.assert_close(mixture.probs[0], manual)
    # the mixture differs between tasks, so the outputs do
    assert not torch.allclose(
        logits(model, batch, task_ids=["A"] * 3), logits(model, batch, task_ids=["B"] * 3)
    )


@pytest.mark.parametrize("mode", ["task", "token+task"])
@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
@pytest.mark.parametrize("router", ROUTERS)
def test_fast_path_equals_reference_and_mixed_batches_equal_single_tasks(
    mode: str, expert_type: str, router: str
) -> None:
    options = dict(router=router, threshold_max=0.5 if router == "threshold" else None)
    model = make(mode, expert_type, **options, aux_loss_coef=0.0 if router == "soft" else 0.01)
    batch = tiny_batch("llama", batch=3, seq=6, seed=3)
    task_ids = ["C", "A", "C"]
    fast = logits(model, batch, task_ids=task_ids)
    with model.reference_path():
        reference = logits(model, batch, task_ids=task_ids)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    if router == "switch":
        return  # expert capacity is per routed group of tokens: a sample alone has other capacity limits
    for row, task in enumerate(task_ids):
        one = {k: v[row : row + 1] for k, v in batch.items()}
        with model.use_tasks([task]):
            alone = logits(model, one)
        torch.testing.assert_close(fast[row : row + 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["task", "token+task"])
def test_embeddings_train_save_and_reload(mode: str, tmp_path) -> None:
    model = make(mode)
    model.train()
    batch = tiny_batch("llama", batch=3, seq=6, seed=5)
    model(**batch, task_ids=torch.tensor([0, 2, 2])).loss.backward()
    for _, layer in model.moe_layers():
        grad = layer.router.task_embedding_blocks[0].grad
        assert grad is not None and grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
        assert grad[1].abs().sum() == 0  # task B was not in the batch
    model.eval()
    expected = logits(model, batch, task_ids=[0, 2, 1])
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)
    reloaded = moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert reloaded.moe_config.task_routing == mode and reloaded.tasks == ["A", "B", "C"]
    assert torch.equal(logits(reloaded, batch, task_ids=[0, 2, 1]), expected)


def test_added_task_gets_its_embedding_and_old_tasks_keep_their_outputs() -> None:
    model = make("token+task", num_shared_experts=1, bias_update_rate=0.05)
    batch = tiny_batch("llama", batch=2, seq=6, seed=7)
    before = {t: logits(model, batch, task_ids=[t, t]) for t in ("A", "B")}
    model.add_experts(2, task="D")
    assert model.tasks == ["A", "B", "C", "D"]
    for _, layer in model.moe_layers():
        blocks = layer.router.task_embedding_blocks
        assert (
            [b.shape[0] for b in blocks] == [3, 1] and not blocks[0].requires_grad and blocks[1].requires_grad
        )
    model.train()
    opt = torch.optim.AdamW(list(model.parameters()), lr=3e-2, weight_decay=0.1)
    for seed in range(3):
        opt.zero_grad()
        model(**tiny_batch("llama", batch=2, seq=6, seed=seed), task_ids=["D", "D"]).loss.backward()
        opt.step()
        model.update_expert_bias()
    model.eval()
    # A owns block 0: it routes among its own experts, bitwise as before. B owns no experts: it routes
    # among all of them, now including D's, so its outputs may change (documented).
    assert torch.equal(logits(model, batch, task_ids=["A", "A"]), before["A"])
    d_out = logits(model, batch, task_ids=["D", "D"])
    assert not torch.allclose(d_out, before["A"])


def test_task_statistics_count_per_task() -> None:
    model = make("task")
    model.reset_routing_stats()
    batch = tiny_batch("llama", batch=3, seq=5, seed=2)
    logits(model, batch, task_ids=["A", "C", "C"])
    for layer_stats in model.routing_stats().values():
        by_task = layer_stats["tokens_per_expert_by_task"]
        real = batch["attention_mask"].sum(1).tolist()
        assert set(by_task) == {"A", "C"}
        assert sum(by_task["A"]) == real[0] * 2 and sum(by_task["C"]) == (real[1] + real[2]) * 2  # k = 2
        for task in ("A", "C"):  # a fixed mixture: one pair of experts for all of a task's tokens
            assert sum(1 for c in by_task[task] if c) == 2


def test_a_task_is_required_and_one_at_a_time() -> None:
    model = make("task")
    batch = tiny_batch("llama", batch=2, seq=5)
    with pytest.raises(ValueError, match=r"task_routing='task' routes by task, but no task was given"):
        logits(model, batch)
    two_tasks = r"names 2 tasks, but task_routing='task' routes by the embedding"
    with pytest.raises(ValueError, match=two_tasks), model.use_tasks(["A", "B"]):
        pass
    with model.use_tasks("B"):
        assert torch.equal(logits(model, batch), logits(model, batch, task_ids=["B", "B"]))
    with pytest.raises(ValueError, match=r"unknown task 'Z': tasks are \['A', 'B', 'C'\]"):
        logits(model, batch, task_ids=["Z", "A"])
