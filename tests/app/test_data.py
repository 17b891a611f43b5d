"""Data: reading records, response-only labels, mixtures, deduplication; run configs; CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moetune.app.data import DataError, Example, deduplicate, encode, load_examples, mix
from moetune.app.evaluation import wilson_interval
from moetune.app.run_config import ConfigError, load_run_config, parse_run_config
from tests.helpers.tiny_models import tiny_chat_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


def test_records_in_every_format(tmp_path) -> None:
    rows = [
        {"prompt": "what is 2 + 2 ?", "response": "4", "task": "math"},
        {"instruction": "hi", "input": "there", "output": "hi"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]},
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text("prompt,response,task\nhi,there,greet\n")
    jsonl = load_examples(tmp_path / "a.jsonl")
    assert jsonl == load_examples(tmp_path / "a.json")
    assert [e.task for e in jsonl] == ["math", "default", "default"]
    assert jsonl[1].messages == (("user", "hi\n\nthere"), ("assistant", "hi"))
    assert load_examples(tmp_path / "a.csv")[0] == Example((("user", "hi"), ("assistant", "there")), "greet")


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        ("", "empty.jsonl", "no records"),
        ('{"prompt": "x"}\n', "noresp.jsonl", "needs a prompt"),
        ('{"prompt": "x", "response": "y", "taks": "a"}\n', "typo.jsonl", r"unknown fields \['taks'\]"),
        ("{not json\n", "bad.jsonl", r"bad.jsonl:1: not valid JSON"),
        ("x", "data.txt", "unknown data format"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', "last.jsonl", "must be the assistant"),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path, content: str, name: str, match: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        load_examples(tmp_path / name)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        load_examples(tmp_path / "nope.jsonl")


def test_loss_only_on_the_response(tokenizer) -> None:
    ex = Example((("user", "what is 2 + 2 ?"), ("assistant", "4")))
    enc = encode(tokenizer, ex)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    assert tokens == [
        "<|im_start|>",
        "user",
        "what",
        "is",
        "2",
        "+",
        "2",
        "?",
        "<|im_end|>",
        "<|im_start|>",
        "assistant",
        "4",
        "<|im_end|>",
    ]
    supervised = [t for t, label in zip(enc["input_ids"], enc["labels"], strict=True) if label != -100]
    assert tokenizer.convert_ids_to_tokens(supervised) == ["4", "<|im_end|>"]  # the answer and the turn's end
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])


def test_truncation_keeps_the_answer(tokenizer) -> None:
    ex = Example((("user", "hi " * 50), ("assistant", "4")))
    enc = encode(tokenizer, ex, max_length=8)
    assert len(enc["input_ids"]) == 8
    assert tokenizer.convert_ids_to_tokens(
        [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != -100]
    ) == ["4", "<|im_end|>"]


def test_mixture_follows_weights_and_dedup() -> None:
    a = [Example((("user", f"a{i}"), ("assistant", "x")), "A") for i in range(10)]
    b = [Example((("user", f"b{i}"), ("assistant", "y")), "B") for i in range(3)]
    out = mix({"A": a, "B": b}, {"A": 3.0, "B": 1.0}, total=40, seed=0)
    assert sum(e.task == "A" for e in out) == 30 and sum(e.task == "B" for e in out) == 10
    assert {e.messages for e in out if e.task == "B"} == {e.messages for e in b}  # the small task repeats
    with pytest.raises(DataError, match="unknown tasks"):
        mix({"A": a}, {"C": 1.0}, total=5)
    test = [Example((("user", "a1"), ("assistant", "other")), "A")]
    kept = deduplicate(a + a[:2], test)
    assert len(kept) == 9 and all(e.messages[0][1] != "a1" for e in kept)


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(50, 100)  # p = 0.5, n = 100: 0.5 -+ 0.0962 (textbook value)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_run_config_typos_are_errors(tmp_path) -> None:
    good = {
        "model": "m",
        "moe": {"num_experts": 4},
        "data": {"train": ["t.jsonl"]},
        "training": {"max_steps": 3},
    }
    cfg = parse_run_config(good)
    assert (
        cfg.moe.num_experts == 4 and cfg.data.train[0].path == "t.jsonl" and cfg.training == {"max_steps": 3}
    )
    for bad, match in [
        ({**good, "modle": "x"}, r"unknown key\(s\) \['modle'\]"),
        ({**good, "moe": {"num_expert": 4}}, r"moe: unknown key\(s\) \['num_expert'\]"),
        ({**good, "training": {"lr": 1}}, r"unknown TrainingArguments field\(s\) \['lr'\]"),
        ({**good, "moe": {"router": "top2"}}, "router='top2' is not supported"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_run_config(bad)
    (tmp_path / "bad.yaml").write_text("moe: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["train", "{dir}/missing.yaml", "--output-dir", "{dir}/o"], "no such config file"),
        (["train", "{dir}/typo.yaml", "--output-dir", "{dir}/o"], "unknown key"),
        (["eval", "--adapter", "{dir}/nothing"], "not an adapter"),
        (["train", "{dir}/empty.yaml", "--output-dir", "{dir}/o"], "empty.jsonl: no records"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, args: list[str], match: str) -> None:
    (tmp_path / "typo.yaml").write_text("moe:\n  num_expert: 4\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.yaml").write_text(f"data: {{train: [{tmp_path / 'empty.jsonl'}]}}\n")
    argv = [a.format(dir=tmp_path) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "moetune.app.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0], proc.stderr


def test_cli_help_comes_from_the_config() -> None:
    from moetune.app.cli import build_parser
    from moetune.config import MoEConfig

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    text = " ".join(train.format_help().split())
    for name, help_text in MoEConfig.help().items():
        assert "--" + name.replace("_", "-") in text
        assert " ".join(help_text.split())[:40] in text


BAD_INPUTS = {
    # name: (YAML config text, {data file: content}, what the one error line says)
    "empty dataset": ("data: {train: [train.jsonl]}", {"train.jsonl": ""}, "train.jsonl: no records"),
    "blank lines only": ("data: {train: [train.jsonl]}", {"train.jsonl": "\n \n"}, "train.jsonl: no records"),
    "empty JSON list": ("data: {train: [train.json]}", {"train.json": "[]"}, "train.json: no records"),
    "empty test set": (
        "data: {train: [train.jsonl], test: [test.jsonl]}",
        {"train.jsonl": '{"prompt": "a", "response": "b"}\n', "test.jsonl": ""},
        "test.jsonl: no records",
    ),
    "missing data file": ("data: {train: [nope.jsonl]}", {}, "nope.jsonl: no such data file"),
    "unknown record field": (
        "data: {train: [train.jsonl]}",
        {"train.jsonl": '{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b", "taks": "x"}\n'},
        "train.jsonl record 2: unknown fields ['taks']",
    ),
    "task not a string": (
        "data: {train: [train.jsonl]}",
        {"train.jsonl": '{"prompt": "a", "response": "b", "task": 3}\n'},
        "train.jsonl record 1: task must be a string, got 3",
    ),
    "unknown data source key": (
        "data: {train: [{path: train.jsonl, taks: a}]}",
        {"train.jsonl": '{"prompt": "a", "response": "b"}\n'},
        "c.yaml: data.train: unknown key(s) ['taks']",
    ),
    "data source without path": (
        "data: {train: [{task: a}]}",
        {},
        "c.yaml: data.train: path=None: give a path (a file) or a dataset",
    ),
    "data source path not a string": ("data: {train: [{path: 3}]}", {}, "c.yaml: data.train: path=3"),
    "weight not a number": (
        "data: {train: [{path: train.jsonl, weight: heavy}]}",
        {"train.jsonl": '{"prompt": "a", "response": "b"}\n'},
        "c.yaml: data.train: weight='heavy'",
    ),
    "train_size not an int": (
        "data: {train: [train.jsonl], train_size: many}",
        {"train.jsonl": '{"prompt": "a", "response": "b"}\n'},
        "c.yaml: data: train_size='many'",
    ),
    "model not a string": ("model: [1]\ndata: {train: [train.jsonl]}", {}, "c.yaml: model=[1]"),
    "seed not an int": ("seed: abc\ndata: {train: [train.jsonl]}", {}, "c.yaml: seed='abc'"),
    "not UTF-8 data": (
        "data: {train: [train.jsonl]}",
        {"train.jsonl": b'{"prompt": "\xff"}\n'},
        "train.jsonl: not UTF-8 text",
    ),
    "train not a list": ("data: {train: 5}", {}, "c.yaml: data.train: expected a file path or a list"),
    "no training files": ("moe: {num_experts: 4}", {}, "c.yaml: data.train: no training files given"),
    "YAML syntax error": ("data: {train: [train.jsonl]\n", {}, "c.yaml: not valid YAML"),
    "YAML key typo": ("data: {trian: [train.jsonl]}", {}, "c.yaml: data: unknown key(s) ['trian']"),
    "missing config file": (None, {}, "c.yaml: no such config file"),
    # TrainingArguments values: coerced by the field's type, and built before any model loads
    "learning rate a word": (
        "data: {train: [train.jsonl]}\ntraining: {learning_rate: fast}",
        {"train.jsonl": '{"prompt": "a", "response": "b"}\n'},
        "c.yaml: training.learning_rate='fast': must be a number",
    ),
    "max_steps not an integer": (
        "data: {train: [train.jsonl]}\ntraining: {max_steps: 2.5}",
        {"train.jsonl": '{"prompt": "a", "response": "b"}\n'},
        "c.yaml: training.max_steps=2.5: must be an integer",
    ),
    "unknown eval strategy": (
        "data: {train: [train.jsonl]}\ntraining: {eval_strategy: often}",
        {"train.jsonl": '{"prompt": "a", "response": "b"}\n'},
        "training: often is not a valid IntervalStrategy, please select one of ['no', 'steps', 'epoch']",
    ),
    "best model, strategies apart": (  # transformers' message has three lines: all of it, on one
        "data: {train: [train.jsonl]}\ntraining: {load_best_model_at_end: true, save_strategy: steps}",
        {"train.jsonl": '{"prompt": "a", "response": "b"}\n'},
        "but found - Evaluation strategy: IntervalStrategy.NO - Save strategy: SaveStrategy.STEPS",
    ),
    "report_to without its package": (
        "data: {train: [train.jsonl]}\ntraining: {report_to: [wandb]}",
        {"train.jsonl": '{"prompt": "a", "response": "b"}\n'},
        "training: WandbCallback requires wandb to be installed",
    ),
    "test task nothing trains": (
        "data: {train: [train.jsonl], test: [test.jsonl]}",
        {
            "train.jsonl": '{"prompt": "a", "response": "b", "task": "qa"}\n',
            "test.jsonl": '{"prompt": "c", "response": "d", "task": "q&a"}\n',
        },
        "data.test: task(s) ['q&a'] have no training records (training tasks: ['qa']); set "
        "data.allow_untrained_test_tasks: true",
    ),
    "test answer none of the options": (
        "data: {train: [train.jsonl], test: [test.jsonl], options: {default: [positive, negative]}}",
        {
            "train.jsonl": '{"prompt": "a", "response": "positive"}\n',
            "test.jsonl": '{"prompt": "c", "response": "Positive"}\n',
        },
        "data.options: task 'default': the test answer 'Positive' is none of the options ['positive', "
        "'negative'], so it could never be scored right",
    ),
    "train_size without balance_tasks": (
        "data: {train: [train.jsonl], train_size: 10}",
        {"train.jsonl": '{"prompt": "a", "response": "b"}\n'},
        "c.yaml: data: train_size=10: needs balance_tasks: true",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_train_bad_input_one_line(tmp_path, capsys, monkeypatch, case: str) -> None:
    """`moetune train` on bad input: exit status 2 and one stderr line naming the file and the problem.

    The config's model directory does not exist: the data are checked before any model is loaded
    (loading one takes seconds to minutes), so the error is about the data, not the model.
    """
    from moetune.app.cli import main

    config, files, expected = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)  # data paths in the configs are relative to it
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    if config is not None:
        model = "" if config.startswith("model:") else f"model: {tmp_path / 'no-model'}\n"
        (tmp_path / "c.yaml").write_text(model + config)
    code = main(["train", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "out")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("moetune train: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing was started
