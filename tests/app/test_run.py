"""The run pipeline end to end on a tiny model: files written, accuracy reproducible from the adapter."""

from __future__ import annotations

import json
import os
import random
from collections import Counter

import pytest
import torch

from moetune.app.data import Example
from moetune.app.evaluation import EvalItem, evaluate
from moetune.app.run import Tasks, train_and_evaluate
from moetune.app.run_config import DataConfig, RunConfig
from moetune.config import MoEConfig
from moetune.model import MoEModel
from tests.helpers.tiny_models import tiny_chat_tokenizer, tiny_model


def toy_tasks(n_train: int = 48, n_test: int = 12) -> Tasks:
    rng = random.Random(0)

    def sentiment() -> Example:
        word = rng.choice(["good", "bad"])
        label = "positive" if word == "good" else "negative"
        return Example(
            (("user", f"Review: {word} film {rng.randint(0, 99)}"), ("assistant", label)), "sentiment"
        )

    def addition() -> Example:
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return Example((("user", f"what is {a} + {b} ?"), ("assistant", str(a + b))), "arithmetic")

    train = {
        "sentiment": [sentiment() for _ in range(n_train)],
        "arithmetic": [addition() for _ in range(n_train)],
    }
    test = {
        "sentiment": [EvalItem(sentiment(), ("positive", "negative")) for _ in range(n_test)],
        "arithmetic": [EvalItem(addition()) for _ in range(n_test)],
    }
    return Tasks(train, test)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(0)
    model = tiny_model("llama")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    cfg = RunConfig(
        model="tiny",
        moe=MoEConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0),
        data=DataConfig(max_length=32),
        training=dict(
            per_device_train_batch_size=8,
            learning_rate=5e-3,
            max_steps=12,
            logging_steps=4,
            disable_tqdm=True,
        ),
    )
    metrics = train_and_evaluate(model, tokenizer, cfg, toy_tasks(), out, log=lambda _m: None)
    return out, metrics, tokenizer


def test_run_writes_its_files(finished_run) -> None:
    out, metrics, _ = finished_run
    for name in (
        "adapter/moetune_config.json",
        "adapter/moetune_model.safetensors",
        "metrics.json",
        "report.md",
        "routing.png",
    ):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "metrics.json")) as fh:
        saved = json.load(fh)
    assert set(saved["before"]) == set(saved["after"]) == {"sentiment", "arithmetic"}
    assert set(saved["routing"]) == {"all tasks", "sentiment", "arithmetic"}
    layer_stats = next(iter(saved["routing"]["sentiment"].values()))
    assert sum(layer_stats["tokens_per_expert"]) > 0
    assert any("moe/aux_loss" in h for h in saved["log_history"])  # router metrics reached the logs
    with open(os.path.join(out, "report.md")) as fh:
        report = fh.read()
    assert "| sentiment | 12 |" in report and "**mean**" in report


def test_adapter_reproduces_after_accuracy(finished_run) -> None:
    out, metrics, tokenizer = finished_run
    base = tiny_model("llama")
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    model = MoEModel.from_pretrained(base, os.path.join(out, "adapter"))
    tasks = toy_tasks()
    for task, items in tasks.test.items():
        assert evaluate(model, tokenizer, items)["accuracy"] == metrics["after"][task], task


def scoring_model(wrap: bool) -> torch.nn.Module:
    """A tiny llama in eval mode; `wrap`: under moetune experts with random nonzero weights."""
    from moetune.model import get_moe_model

    model = tiny_model("llama")
    if wrap:
        model = get_moe_model(model, MoEConfig(num_experts=4, lora_dropout=0.0))
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.2)
    return model.eval()


@pytest.mark.parametrize("wrap", [False, True])
def test_cached_option_scores_equal_full_sequences(wrap: bool) -> None:
    """option_logprobs (prompt once + repeated KV cache) equals scoring each prompt+option row in full."""
    from moetune.app.evaluation import option_logprobs, option_logprobs_batch

    tokenizer = tiny_chat_tokenizer()
    model = scoring_model(wrap)
    prompt = "<|im_start|> user what is 2 + 2 ? <|im_end|> <|im_start|> assistant"
    options = ["4 <|im_end|>", "positive negative 5 <|im_end|>", "hi"]
    short = "<|im_start|> user hi <|im_end|> <|im_start|> assistant"
    batched = option_logprobs_batch(model, tokenizer, [short, prompt], options)  # left padding on `short`
    got = option_logprobs(model, tokenizer, prompt, options)
    assert batched[1] == pytest.approx(got, abs=1e-4)
    assert batched[0] == pytest.approx(option_logprobs(model, tokenizer, short, options), abs=1e-4)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for option, score in zip(options, got, strict=True):
        o_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + o_ids])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
        expected = sum(float(logp[len(p_ids) + j - 1, t]) for j, t in enumerate(o_ids))
        assert score == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("wrap", [False, True])
def test_teacher_forced_exact_match_is_greedy_decoding(wrap: bool, monkeypatch) -> None:
    """greedy_matches (one left-padded forward) says True exactly for the answers greedy decoding
    produces: here each prompt's own greedy continuation of 1-4 tokens (no end marker, so that a random
    model can match), and False once any token, or the end marker, differs."""
    import moetune.app.evaluation as evaluation

    tokenizer = tiny_chat_tokenizer()
    model = scoring_model(wrap)
    prompts = [
        "<|im_start|> user what is 2 + 2 ? <|im_end|> <|im_start|> assistant",
        "<|im_start|> user hi <|im_end|> <|im_start|> assistant",
        "<|im_start|> user Review: good film positive bad 7 8 9 <|im_end|> <|im_start|> assistant",
    ]
    greedy = []
    for prompt, n in zip(prompts, (1, 3, 4), strict=True):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        greedy.append(out[0, ids.shape[1] :].tolist())
    answers = [tokenizer.decode(g) for g in greedy]
    assert [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers] == greedy

    monkeypatch.setattr(evaluation, "end_of_turn", lambda _tok: "")  # answers without an end marker
    assert evaluation.greedy_matches(model, tokenizer, prompts, answers) == [True, True, True]
    vocab = [w for w in tokenizer.get_vocab() if not w.startswith("<")]
    wrong = []
    for g, pos in zip(greedy, (0, 1, 3), strict=True):  # one token changed, first, middle or last
        ids = list(g)
        ids[pos] = next(
            tokenizer.convert_tokens_to_ids(w) for w in vocab if tokenizer.convert_tokens_to_ids(w) != g[pos]
        )
        wrong.append(tokenizer.decode(ids))
    assert evaluation.greedy_matches(model, tokenizer, prompts, wrong) == [False, False, False]
    monkeypatch.undo()
    # with the chat template's end marker, the model must also predict the end after the answer
    ends = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = []
    for prompt, g in zip(prompts, greedy, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=len(g) + 1, do_sample=False, pad_token_id=0)
        expected.append(out[0, ids.shape[1] :].tolist() == [*g, ends])
    assert evaluation.greedy_matches(model, tokenizer, prompts, answers) == expected


@pytest.mark.parametrize("task_routing", ["none", "token+task"])
def test_padding_free_batches_give_the_padded_loss_and_gradients(tmp_path, task_routing: str) -> None:
    """data.padding_free: the Trainer's batch is one row of the examples back to back (position ids
    restarting per example, no attention mask); loss, balance losses and gradients equal those of the
    padded batch of the same examples, with the output head at every position or (label_logits_only)
    only at the positions that predict a label. With task routing the batch names each packed
    example's task, and every token routes by its own example's task."""
    from moetune.app.run import trainer_inputs, training_mixture
    from moetune.model import get_moe_model

    tokenizer = tiny_chat_tokenizer()
    tasks = toy_tasks(n_train=4, n_test=2)
    by_task = task_routing != "none"
    task_fields = (
        dict(task="sentiment", extra_tasks=["arithmetic"], task_routing=task_routing) if by_task else {}
    )
    results = {}
    for padding_free, label_logits_only in ((False, False), (True, False), (True, True)):
        cfg = RunConfig(
            moe=MoEConfig(
                num_experts=4, top_k=2, r=4, lora_dropout=0.0, importance_loss_coef=0.1, **task_fields
            ),
            data=DataConfig(max_length=32, padding_free=padding_free, label_logits_only=label_logits_only),
            training=dict(per_device_train_batch_size=8),
        )
        mixture = training_mixture(cfg, tasks)
        names = cfg.moe.task_names() if by_task else None
        inputs = trainer_inputs(tokenizer, cfg, mixture, str(tmp_path), task_names=names)
        batch = inputs["data_collator"]([inputs["train_dataset"][i] for i in range(8)])
        if by_task:
            expected = [names.index(ex.task) for ex in mixture[:8]]
            assert batch["task_ids"].tolist() == expected and len(set(expected)) == 2
        else:
            assert "task_ids" not in batch
        if padding_free:  # without a KV cache: transformers reads packed position ids only then
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
            assert batch["use_cache"] is False
            starts = (batch["position_ids"][0] == 0).nonzero().flatten()
            assert len(starts) == 8 and (batch["labels"][0, starts] == -100).all()
        else:
            assert batch["input_ids"].shape[0] == 8 and (batch["attention_mask"] == 0).any()  # padded
        if label_logits_only:  # position p predicts token p + 1: kept exactly where that one is a label
            keep = batch["logits_to_keep"]
            labels = batch["labels"][0]
            assert keep.tolist() == [p for p in range(len(labels) - 1) if labels[p + 1] != -100]
            assert batch["shift_labels"][0].tolist() == labels[keep + 1].tolist()
            assert 0 < len(keep) < len(labels) // 2  # the prompts are most of the row
        else:
            assert "logits_to_keep" not in batch and "shift_labels" not in batch
        torch.manual_seed(0)
        model = get_moe_model(tiny_model("llama"), cfg.moe)
        for p in model.parameters():  # nonzero experts: the comparison is not of the base alone
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.2)
        model.train()
        out = model(**batch)
        positions = len(batch["logits_to_keep"]) if label_logits_only else batch["input_ids"].shape[1]
        assert out.logits.shape[1] == positions
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[padding_free, label_logits_only] = (out.loss.detach(), model.aux_losses(), grads)
    loss0, aux0, grads0 = results[False, False]
    for key in ((True, False), (True, True)):
        loss1, aux1, grads1 = results[key]
        torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
        for name in aux0:
            torch.testing.assert_close(aux1[name].detach(), aux0[name].detach(), rtol=1e-5, atol=1e-6)
        assert grads0.keys() == grads1.keys() and any("lora_B" in n for n in grads0)
        for name in grads0:
            torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=f"{key} {name}")
    if by_task:  # the task embeddings are trained, and by both tasks
        embedding_grads = [g for n, g in grads0.items() if "task_embed" in n]
        assert embedding_grads and all((g.abs().sum(-1) > 0).all() for g in embedding_grads)


def _records(task: str, prompts: list[str]) -> list[Example]:
    return [Example((("user", p), ("assistant", "x")), task) for p in prompts]


def test_training_data_is_used_as_given_unless_a_rule_says_otherwise() -> None:
    """30 + 30 + 30 records: a has 10 prompts three times each, b has 5 records that are test items,
    c has 30 distinct ones. As given every record trains once; each rule drops or resamples exactly
    the records it names, and says so in one line."""
    from moetune.app.run import CURATED_DATA, training_mixture

    train = {
        "a": _records("a", [f"a{i % 10}" for i in range(30)]),
        "b": _records("b", [f"b{i}" for i in range(30)]),
        "c": _records("c", [f"c{i}" for i in range(30)]),
    }
    test = {"b": [EvalItem(ex) for ex in _records("b", [f"b{i}" for i in range(5)])]}
    tasks = Tasks(train, test, {"a": 1.0, "b": 1.0, "c": 1.0})

    def mixture(**rules) -> tuple[list[Example], list[str]]:
        lines: list[str] = []
        mixed = training_mixture(RunConfig(data=DataConfig(**rules)), tasks, lines.append)
        return mixed, lines

    as_given, lines = mixture()
    assert as_given == train["a"] + train["b"] + train["c"]  # every record, once, in file order
    assert lines == ["data: 90 training records (a: 30, b: 30, c: 30)"]

    deduplicated, lines = mixture(deduplicate=True)
    assert Counter(ex.task for ex in deduplicated) == {"a": 10, "b": 30, "c": 30}
    assert lines[1] == "data.deduplicate: dropped 20 records whose prompt repeats an earlier one (a: 20)"

    no_overlap, lines = mixture(drop_test_overlap=True)
    assert Counter(ex.task for ex in no_overlap) == {"a": 30, "b": 25, "c": 30}
    assert not {ex.messages[0][1] for ex in no_overlap} & {f"b{i}" for i in range(5)}
    assert lines[1] == "data.drop_test_overlap: dropped 5 records whose prompt is a test item (b: 5)"

    curated, lines = mixture(**CURATED_DATA)  # 65 distinct, non-test records in three equal shares
    assert Counter(ex.task for ex in curated) == {"a": 22, "b": 22, "c": 22}  # round(65 / 3) each
    repeats = Counter(ex.messages[0][1] for ex in curated if ex.task == "a")
    assert sorted(repeats.values()) == [2] * 8 + [3] * 2  # a's 10 prompts cycled: 22 = 2 rounds + 2
    assert lines[-1] == "data.balance_tasks: 66 examples (a: 22 from 10, b: 22 from 25, c: 22 from 30)"

    sized, _ = mixture(balance_tasks=True, train_size=12)
    assert Counter(ex.task for ex in sized) == {"a": 4, "b": 4, "c": 4}


def test_mixture_settings_need_balance_tasks() -> None:
    from moetune.app.run_config import ConfigError, DataSource

    with pytest.raises(ConfigError, match=r"train_size=100: needs balance_tasks: true"):
        DataConfig(train_size=100)
    with pytest.raises(ConfigError, match=r"weight=\['t.jsonl'\]: of a training file needs balance_tasks"):
        DataConfig(train=[DataSource("t.jsonl", weight=2.0)])
    with pytest.raises(ConfigError, match=r"deduplicate='yes': must be true or false"):
        DataConfig(deduplicate="yes")
    DataConfig(train=[DataSource("t.jsonl", weight=2.0)], train_size=100, balance_tasks=True)


def test_held_out_checks_by_hand() -> None:
    from moetune.app.run import check_held_out
    from moetune.app.run_config import ConfigError

    item = EvalItem(_records("b", ["b0"])[0])
    check_held_out({"a"}, {"b": [item]}, allow_untrained=True)  # transfer to an untrained task: asked for
    with pytest.raises(ConfigError, match=r"task\(s\) \['b'\] have no training records"):
        check_held_out({"a"}, {"b": [item]}, allow_untrained=False)
    check_held_out({"b"}, {"b": [EvalItem(item.example, ("x", "y"))]}, allow_untrained=False)  # "x": fine
    with pytest.raises(ConfigError, match=r"the test answer 'x' is none of the options \['y', 'z'\]"):
        check_held_out({"b"}, {"b": [EvalItem(item.example, ("y", "z"))]}, allow_untrained=False)


def test_every_example_config_parses() -> None:
    """examples/*.yaml: a typo in a shipped config fails here (the YAML schema refuses unknown keys)."""
    from pathlib import Path

    from moetune.app.run_config import load_run_config

    root = Path(__file__).resolve().parents[2] / "examples"
    configs = sorted(root.glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        cfg = load_run_config(path)
        assert cfg.moe.num_experts, path.name
    baseline = load_run_config(root / "lora-baseline.yaml").moe
    assert (baseline.num_experts, baseline.top_k, baseline.r) == (1, 1, 16)
