"""Tasks and continual learning: experts owned by tasks, `add_experts`, task-restricted
routing through `use_tasks` and `task_ids`, and the guarantee that an old task's outputs survive
training a new task on new experts."""

from __future__ import annotations

import pytest
import torch

import moetune
from moetune.core.layers import MoEFFN, MoELinear
from tests.helpers.models import ROUTERS
from tests.helpers.tiny_models import tiny_batch, tiny_model

# shared experts, attention LoRA and a trained copy of lm_head: everything freeze_existing must keep
BASE = dict(
    task="A",
    num_experts=4,
    top_k=2,
    r=4,
    lora_dropout=0.0,
    bias_update_rate=0.05,
    num_shared_experts=1,
    attn_r=2,
    modules_to_save=["lm_head"],
)


def make(expert_type: str = "ffn", **overrides) -> moetune.MoEModel:
    cfg = moetune.MoEConfig(**(BASE | {"expert_type": expert_type} | overrides))
    return moetune.get_moe_model(tiny_model("llama"), cfg)


def train(model: moetune.MoEModel, seeds: list[int], task_ids=None, weight_decay: float = 0.1) -> None:
    """AdamW (weight decay > 0) over *every* parameter of the model, the aux-free bias update after
    each step: frozen weights must survive an optimizer that holds them."""
    model.train()
    opt = torch.optim.AdamW(list(model.parameters()), lr=3e-2, weight_decay=weight_decay)
    for seed in seeds:
        opt.zero_grad()
        batch = tiny_batch("llama", batch=4, seq=8, seed=seed)
        model(**batch, task_ids=task_ids).loss.backward()
        opt.step()
        model.update_expert_bias()
    model.eval()


def logits(model: moetune.MoEModel, batch: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits


def adapter_state(model: moetune.MoEModel) -> dict[str, torch.Tensor]:
    from moetune.io.adapter import adapter_state_dict

    return {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}


def mixed_batch() -> dict:
    """Rows 0 and 2 from one batch, rows 1 and 3 from another (the last row padded)."""
    a, b = tiny_batch("llama", batch=4, seq=8, seed=21), tiny_batch("llama", batch=4, seq=8, seed=22)
    return {k: torch.stack([a[k][0], b[k][1], a[k][2], b[k][3]]) for k in ("input_ids", "attention_mask")}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---- the guarantee -------------------------------------------------------------------------------
@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
def test_old_task_outputs_survive_training_a_new_task(expert_type: str, tmp_path) -> None:
    model = make(expert_type)
    train(model, seeds=[1, 2, 3])
    eval_a, mixed = tiny_batch("llama", batch=3, seq=8, seed=11), mixed_batch()
    stage_a, stage_a_mixed = logits(model, eval_a), logits(model, mixed)
    before = adapter_state(model)
    E0 = [layer.router.num_experts for _, layer in model.moe_layers()]

    model.add_experts(2, task="B")
    train(model, seeds=[4, 5, 6])  # odd: the ±rate bias steps cannot cancel out

    # everything trained for A is bitwise as it was, the bias entries of A's experts included ...
    after = adapter_state(model)
    for key, old in before.items():
        new = after[key][: old.shape[0]] if key.endswith("expert_bias") else after[key]
        assert torch.equal(new, old), key
    # ... while B's experts, router rows and bias entries did train
    for (_, layer), e0 in zip(model.moe_layers(), E0, strict=True):
        assert layer.router.expert_bias[e0:].abs().sum() > 0
        assert layer.router.weight_blocks[1].grad is not None
        assert all(bank.lora_B[1].abs().sum() > 0 for bank in layer.expert_banks())

    # A's outputs under use_tasks(["A"]) are the ones saved after stage A
    with model.use_tasks(["A"]):
        got = logits(model, eval_a)
    diff = max_diff(got, stage_a)
    print(f"\n{expert_type}: max |use_tasks(['A']) - stage A| = {diff:.3g}")
    assert diff <= 1e-6
    assert max_diff(logits(model, eval_a), stage_a) > 1e-4  # routing among all experts uses B's

    # mixed batches: rows of A equal their stage-A outputs, rows of B their use_tasks(["B"]) outputs
    with model.use_tasks("B"):
        only_b = logits(model, mixed)
    for task_ids in (torch.tensor([0, 1, 0, 1]), ["A", "B", "A", "B"]):
        rows = logits(model, mixed, task_ids=task_ids)
        diff = max_diff(rows[[0, 2]], stage_a_mixed[[0, 2]])
        print(f"{expert_type}: max |task_ids rows of A - stage A| = {diff:.3g}")
        assert diff <= 1e-6
        assert max_diff(rows[[1, 3]], only_b[[1, 3]]) <= 1e-6
    assert max_diff(only_b[[0, 2]], stage_a_mixed[[0, 2]]) > 1e-4  # B's experts differ from A's

    # save and reload the expanded model: the same blocks, the same outputs
    expanded = logits(model, eval_a)
    model.save_pretrained(tmp_path)
    reloaded = moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert reloaded.tasks == ["A", "B"]
    with reloaded.use_tasks(["A"]):
        assert max_diff(logits(reloaded, eval_a), stage_a) <= 1e-6
    assert max_diff(logits(reloaded, eval_a), expanded) <= 1e-6
    rows = logits(reloaded, mixed, task_ids=["A", "B", "A", "B"])
    assert max_diff(rows[[0, 2]], stage_a_mixed[[0, 2]]) <= 1e-6


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
def test_use_tasks_after_add_experts_is_bitwise_the_old_model(expert_type: str, router: str) -> None:
    """An old task's experts are computed from their own blocks on the same shapes: not even rounding
    changes (switch capacity and the threshold's 1/E count the task's own experts)."""
    model = make(expert_type, router=router, capacity_factor=0.5, aux_loss_coef=0.0)
    for p in model.parameters():  # nonzero B everywhere, so that every expert matters
        if p.requires_grad:
            p.data.normal_(0, 0.3)
    batch = tiny_batch("llama", batch=3, seq=8, seed=3)
    before = logits(model, batch)
    model.add_experts(3, task="B", freeze_existing=False)
    for _, layer in model.moe_layers():
        for bank in layer.expert_banks():
            bank.lora_B[1].data.normal_(0, 0.3)
        layer.router.weight_blocks[1].data.normal_(0, 1.0)
    with model.use_tasks(["A"]):
        assert torch.equal(logits(model, batch), before)
    assert not torch.equal(logits(model, batch), before)


# ---- ownership -----------------------------------------------------------------------------------
@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
def test_add_experts_appends_a_block_everywhere_and_freezes_the_rest(expert_type: str) -> None:
    cfg = moetune.MoEConfig(**(BASE | {"expert_type": expert_type}))
    model = moetune.get_moe_model(tiny_model("llama"), cfg)
    model.add_experts(3, task="B")
    assert model.tasks == ["A", "B"]
    assert model.moe_config.added_experts == [{"task": "B", "num_experts": 3, "freeze_existing": True}]
    assert cfg.added_experts == []  # the caller's config object is left alone
    layers = list(model.moe_layers())
    assert layers and all(isinstance(m, MoEFFN if expert_type == "ffn" else MoELinear) for _, m in layers)
    for _, layer in layers:
        router = layer.router
        assert [w.shape[0] for w in router.weight_blocks] == [4, 3]
        assert router.expert_bias.shape == (7,) and router.load_counts.shape == (7,)
        for bank in layer.expert_banks():
            assert [a.shape[0] for a in bank.lora_A] == [4 + 1, 3]  # block 0 also holds the shared expert
            assert torch.equal(bank.lora_B[1], torch.zeros_like(bank.lora_B[1]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("weight_blocks.1", "lora_A.1", "lora_B.1")) for n in trainable)
    assert len(trainable) == sum(1 + 2 * len(layer.expert_banks()) for _, layer in layers)


def test_freeze_existing_false_keeps_old_experts_trainable() -> None:
    model = make()
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    model.add_experts(2, task="B", freeze_existing=False)
    after = {n for n, p in model.named_parameters() if p.requires_grad}
    assert before < after
    assert all(n.endswith(("weight_blocks.1", "lora_A.1", "lora_B.1")) for n in after - before)


def test_from_pretrained_rebuilds_blocks_and_their_freezing(tmp_path) -> None:
    model = make()
    model.add_experts(2, task="B")
    model.add_experts(1, task="C", freeze_existing=False)
    model.save_pretrained(tmp_path)
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    trainable = moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    assert trainable.tasks == ["A", "B", "C"]
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == want
    frozen = moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())


# ---- routing -------------------------------------------------------------------------------------
def test_k_shrinks_to_the_experts_a_task_owns() -> None:
    """top_k=2, but task C owns one expert: each of its tokens gets that expert alone."""
    model = make()
    model.add_experts(1, task="C")
    batch = tiny_batch("llama", batch=2, seq=6, seed=2)
    real = int(batch["attention_mask"].sum())
    model.reset_routing_stats()
    with model.use_tasks(["C"]):
        logits(model, batch)
    for st in model.routing_stats().values():
        assert st["tokens_per_expert"] == [0, 0, 0, 0, real]
        assert st["tokens_per_expert_by_task"] == {"C": [0, 0, 0, 0, real]}
    model.reset_routing_stats()
    with model.use_tasks(["A", "C"]):  # 5 experts: k = 2 again
        logits(model, batch)
    for st in model.routing_stats().values():
        assert sum(st["tokens_per_expert"]) == 2 * real
        assert st["tokens_per_expert_by_task"] == {}  # two tasks: no single task to count for


def test_training_without_task_ids_routes_among_all_experts() -> None:
    model = make()
    model.add_experts(2, task="B")
    model.train()
    model.reset_routing_stats()
    model(**tiny_batch("llama", batch=4, seq=8, seed=5))
    for st in model.routing_stats().values():
        assert sum(st["tokens_per_expert"][:4]) > 0 and sum(st["tokens_per_expert"][4:]) > 0


def test_task_ids_count_tokens_per_task_and_train() -> None:
    """Per-sample tasks: each task's tokens reach its own experts only; a mixed batch trains (with the
    contrastive loss, whose expert outputs then cover each task's experts)."""
    model = make(contrastive_loss_coef=0.1)
    model.add_experts(2, task="B")
    batch = tiny_batch("llama", batch=4, seq=8, seed=6)  # the last row has 2 padding tokens
    model.train()
    model.reset_routing_stats()
    out = model(**batch, task_ids=torch.tensor([1, 0, 1, 0]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(model.aux_losses()) >= {"aux_loss", "contrastive_loss"}
    for _, layer in model.moe_layers():
        assert layer.router.weight_blocks[1].grad.abs().sum() > 0
    for st in model.routing_stats().values():
        by_task = st["tokens_per_expert_by_task"]
        assert by_task["A"][4:] == [0, 0] and sum(by_task["A"]) == 2 * (8 + 6)  # rows 1 and 3, k = 2
        assert by_task["B"][:4] == [0, 0, 0, 0] and sum(by_task["B"]) == 2 * (8 + 8)


def test_generate_with_task_ids_follows_each_rows_task() -> None:
    model = make()
    model.add_experts(2, task="B", freeze_existing=False)
    for _, layer in model.moe_layers():
        for bank in layer.expert_banks():
            bank.lora_B[1].data.normal_(0, 0.5)
    prompt = tiny_batch("llama", batch=2, seq=5, seed=8, padded=False)["input_ids"]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixed = model.generate(prompt, task_ids=["A", "B"], **kwargs)
    for row, task in enumerate(["A", "B"]):
        with model.use_tasks([task]):
            assert torch.equal(mixed[row], model.generate(prompt[row : row + 1], **kwargs)[0])


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_task_input_names_the_value_and_what_is_allowed() -> None:
    model = make()
    model.add_experts(2, task="B")
    batch = tiny_batch("llama", batch=2, seq=5)
    for n in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"n={n!r}: must be an int >= 1"):
            model.add_experts(n, task="C")
    with pytest.raises(ValueError, match=r"task 'B' exists already \(tasks: \['A', 'B'\]\)"):
        model.add_experts(2, task="B")
    with pytest.raises(ValueError, match=r"task 'A' exists already"):
        model.add_experts(2, task="A")
    with pytest.raises(ValueError, match=r"task='': must be a non-empty"):
        model.add_experts(2, task="")
    unknown = r"use_tasks: unknown task 'Z': tasks are \['A', 'B'\]"
    with pytest.raises(ValueError, match=unknown), model.use_tasks(["A", "Z"]):
        pass
    with pytest.raises(ValueError, match=r"use_tasks: no task given"), model.use_tasks([]):
        pass
    with pytest.raises(ValueError, match=r"task_ids: unknown task 2: tasks are \['A', 'B'\]"):
        model(**batch, task_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"task_ids: unknown task 'C'"):
        model(**batch, task_ids=["A", "C"])
    with pytest.raises(ValueError, match=r"task_ids: 3 tasks given for a batch of 2 samples"):
        model(**batch, task_ids=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"task_ids: expected an integer tensor of shape \(batch,\)"):
        model(**batch, task_ids=torch.tensor([0.0, 1.0]))
    assert model.tasks == ["A", "B"] and len(model.moe_config.added_experts) == 1  # nothing changed


def test_bad_task_config_is_a_clear_error() -> None:
    block = {"task": "B", "num_experts": 2, "freeze_existing": True}
    with pytest.raises(ValueError, match=r"task='A' must be a new non-empty name \(tasks before: \['A'\]\)"):
        moetune.MoEConfig(task="A", added_experts=[block | {"task": "A"}])
    with pytest.raises(ValueError, match=r"added_experts\[0\].num_experts=0: must be an int >= 1"):
        moetune.MoEConfig(added_experts=[block | {"num_experts": 0}])
    with pytest.raises(ValueError, match=r"added_experts\[0\]=.*exactly the keys"):
        moetune.MoEConfig(added_experts=[{"task": "B"}])
    with pytest.raises(ValueError, match=r"task='': must be a non-empty string"):
        moetune.MoEConfig(task="")
    with pytest.raises(ValueError, match=r"extra_tasks\[1\]='X': must be a new non-empty name"):
        moetune.MoEConfig(extra_tasks=["X", "X"])
    with pytest.raises(ValueError, match=r"extra_tasks\[0\]='default': must be a new"):
        moetune.MoEConfig(extra_tasks=["default"])
    with pytest.raises(ValueError, match=r"added_experts\[0\]: task='X' must be a new"):
        moetune.MoEConfig(extra_tasks=["X"], added_experts=[block | {"task": "X"}])
    cfg = moetune.MoEConfig(added_experts=[block])
    assert moetune.MoEConfig.from_dict(cfg.to_dict()) == cfg


def test_shared_experts_serve_every_task() -> None:
    """The shared expert (stored after A's experts in block 0) is applied to the tokens of every task."""
    model = make()
    model.add_experts(2, task="B", freeze_existing=False)
    batch = tiny_batch("llama", batch=2, seq=6, seed=4)
    shared_B = [bank.lora_B[0][4] for _, layer in model.moe_layers() for bank in layer.expert_banks()]
    for tasks in (["A"], ["B"], ["A", "B"]):
        with model.use_tasks(tasks):
            without = logits(model, batch)
            with torch.no_grad():
                for B in shared_B:
                    B.normal_(0, 0.5)
            assert max_diff(logits(model, batch), without) > 1e-4, tasks
            with torch.no_grad():
                for B in shared_B:
                    B.zero_()


def test_packed_groups_by_hand() -> None:
    """A padding-free row of three examples (lengths 2, 3, 1) with tasks A, B, A: each group holds the
    positions of its examples' tokens; a count that does not match the row is refused."""
    from moetune.core import tasks as tasks_of

    cfg = moetune.MoEConfig(task="A", extra_tasks=["B"])
    position_ids_1L = torch.tensor([[0, 1, 0, 1, 2, 0]])
    assert tasks_of.packed_examples(position_ids_1L, batch=1) == 3
    assert tasks_of.packed_examples(position_ids_1L, batch=2) == 0  # not one row: not packed
    assert tasks_of.packed_examples(None, batch=1) == 0
    groups = tasks_of.packed_groups(cfg, ["A", "B", "A"], position_ids_1L)
    assert [(task, rows.tolist()) for _, task, rows in groups] == [(0, [0, 1, 5]), (1, [2, 3, 4])]
    with pytest.raises(ValueError, match="2 tasks given for a packed row of 3 examples"):
        tasks_of.packed_groups(cfg, ["A", "B"], position_ids_1L)
    with pytest.raises(ValueError, match="must start at 0"):
        tasks_of.packed_groups(cfg, ["A", "B"], torch.tensor([[1, 0, 1]]))
