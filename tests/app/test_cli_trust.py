"""`moetune train` as a user meets it, on a tiny local model: the data trained as given, YAML numbers
read as numbers, output directories never overwritten unasked, files others can read, strict JSON."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moetune.app import demo
from moetune.app.cli import main
from tests.helpers.tiny_models import tiny_chat_tokenizer, tiny_model

WORDS = ("good", "bad")


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A run directory: tiny-llama/, train.jsonl (20 records: 4 repeated, 2 also test items), test.jsonl."""
    tokenizer = tiny_chat_tokenizer()
    base = tiny_model("llama")
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    base.save_pretrained(tmp_path / "tiny-llama")
    tokenizer.save_pretrained(tmp_path / "tiny-llama")
    rows = [{"prompt": f"Review: {w} film {i}", "response": w} for i in range(8) for w in WORDS]  # 16
    rows += rows[:4]  # 4 repeats
    test = [{"prompt": f"Review: {w} film {i}", "response": w} for i in (0, 20, 21) for w in WORDS[:1]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(
    root, data: str = "train: [train.jsonl], test: [test.jsonl]", training: str = "", experts: int = 2
) -> str:
    (root / "c.yaml").write_text(
        "model: tiny-llama\n"
        f"moe: {{num_experts: {experts}, top_k: 1, r: 2, lora_dropout: 0.0}}\n"
        f"data: {{{data}, max_length: 16}}\n"
        f"training: {{per_device_train_batch_size: 4, max_steps: 1, disable_tqdm: true{training}}}\n"
    )
    return "c.yaml"


@pytest.fixture
def model_loads(monkeypatch) -> list[str]:
    """The names of the models `moetune train` loaded."""
    loaded: list[str] = []
    load = demo.load_model

    def counting(name: str = "smollm2", *args):
        loaded.append(os.path.basename(name))
        return load(name, *args)

    monkeypatch.setattr(demo, "load_model", counting)
    return loaded


def train(*argv: str) -> int:
    return main(["train", *argv])


def test_every_record_trains_as_given_and_yaml_numbers_are_numbers(root, capsys) -> None:
    """20 records in, 20 examples trained (YAML's `1e-3`, a string to PyYAML, is the learning rate)."""
    config = write_config(root, training=", learning_rate: 1e-3, logging_steps: 1")
    assert train(config, "--output-dir", "out") == 0
    err = capsys.readouterr().err
    assert "data: 20 training records (default: 20)" in err
    assert "training on 20 examples (default: 20)" in err
    assert "data.deduplicate" not in err and "data.drop_test_overlap" not in err
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    assert metrics["train_examples"] == 20 and metrics["training"]["learning_rate"] == 0.001
    lrs = [h["learning_rate"] for h in metrics["log_history"] if "learning_rate" in h]
    assert lrs and all(isinstance(lr, float) for lr in lrs)


def test_data_rules_say_what_they_changed(root, capsys) -> None:
    rules = "deduplicate: true, drop_test_overlap: true, balance_tasks: true"
    config = write_config(root, data=f"train: [train.jsonl], test: [test.jsonl], {rules}")
    assert train(config, "--output-dir", "out") == 0
    err = capsys.readouterr().err
    assert "data.drop_test_overlap: dropped 2 records whose prompt is a test item (default: 2)" in err
    # of the 4 repeats, the 2 copies of "good film 0" went with the test items: 3 repeats are left
    assert "data.deduplicate: dropped 3 records whose prompt repeats an earlier one (default: 3)" in err
    assert "data.balance_tasks: 15 examples (default: 15 from 15)" in err


def test_a_used_output_directory_needs_overwrite_and_nothing_stale_stays(root, capsys, model_loads) -> None:
    config = write_config(root)
    assert train(config, "--output-dir", "out") == 0
    assert model_loads == ["tiny-llama"]
    (root / "out" / "task_expert.png").write_bytes(b"an old plot")  # as `moetune stats` leaves one
    capsys.readouterr()

    assert train(config, "--output-dir", "out") == 2  # refused before any model loads
    assert capsys.readouterr().err.strip() == (
        "moetune train: error: --output-dir out: not empty; pass --overwrite to replace the run there, "
        "or --resume to continue it"
    )
    assert model_loads == ["tiny-llama"]

    assert train(config, "--output-dir", "out", "--resume") == 2  # nothing to resume
    assert "--resume: no complete checkpoint in out/checkpoints" in capsys.readouterr().err
    assert model_loads == ["tiny-llama"]

    assert train(config, "--output-dir", "out", "--overwrite") == 0
    assert not (root / "out" / "task_expert.png").exists()
    assert model_loads == ["tiny-llama"] * 2

    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("not a run")
    assert train(config, "--output-dir", "mine", "--overwrite") == 2
    assert "also holds ['thesis.tex']; choose another directory" in capsys.readouterr().err
    assert (root / "mine" / "thesis.tex").read_text() == "not a run"


def test_written_files_follow_the_umask(root) -> None:
    """Under umask 022 every file is 0644 and every directory 0755, as open() and mkdir() give."""
    old = os.umask(0o022)
    try:
        assert train(write_config(root), "--output-dir", "out") == 0
        assert main(["export", "--adapter", "out/adapter", "exported"]) == 0  # a Mixtral checkpoint
        assert main(["convert", "--to", "mixlora", "out/adapter", "mix"]) == 0
    finally:
        os.umask(old)
    paths = [root / top for top in ("out", "exported", "mix")] + [
        os.path.join(d, name)
        for top in ("out", "exported", "mix")
        for d, dirs, files in os.walk(root / top)
        for name in dirs + files
    ]
    modes = {str(p): stat.S_IMODE(os.stat(p).st_mode) for p in paths}
    assert {"adapter", "metrics.json", "report.md"} <= set(os.listdir(root / "out"))
    for path, mode in modes.items():
        assert mode == (0o755 if os.path.isdir(path) else 0o644), (path, oct(mode))


def test_without_test_data_the_files_say_so_and_hold_no_nan(root, capsys) -> None:
    assert train(write_config(root, data="train: [train.jsonl]"), "--output-dir", "out") == 0
    assert "no test data (data.test): accuracy not measured" in capsys.readouterr().err

    def no_constants(name: str):
        raise AssertionError(f"metrics.json holds {name}")

    metrics = json.loads((root / "out" / "metrics.json").read_text(), parse_constant=no_constants)
    assert metrics["mean_before"] is None and metrics["mean_after"] is None
    report = (root / "out" / "report.md").read_text()
    assert "No test data (`data.test`)" in report and "routing.png" not in report and "nan" not in report
    assert not (root / "out" / "routing.png").exists()


def test_eval_scores_given_test_files_even_for_a_converted_adapter(root, capsys) -> None:
    """`eval --data` on the trained adapter and on its round trip through MixLoRA's format (no run
    record: --base names the model): the same accuracy, from a file the run never saw."""
    assert train(write_config(root, data="train: [train.jsonl]"), "--output-dir", "out") == 0
    (root / "new.jsonl").write_text(
        "".join(
            json.dumps({"prompt": f"Review: {w} show {i}", "response": w}) + "\n"
            for i in range(3)
            for w in WORDS
        )
    )
    adapter = str(root / "out" / "adapter")
    assert main(["eval", "--adapter", adapter]) == 2  # the run had no test data
    assert "no test items to score (the run had no test data): give --data" in capsys.readouterr().err
    assert main(["eval", "--adapter", adapter, "--data", "new.jsonl"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert main(["convert", "--to", "mixlora", adapter, "mix"]) == 0
    assert main(["convert", "--from", "mixlora", "mix", "back"]) == 0
    assert not (root / "back" / demo.RUN_FILE).exists()
    capsys.readouterr()
    assert main(["eval", "--adapter", "back", "--data", "new.jsonl", "--base", "tiny-llama"]) == 0
    converted = json.loads(capsys.readouterr().out)
    assert trained.keys() == converted.keys() == {"default"}
    assert converted["default"] == pytest.approx(trained["default"])


def test_yaml_paths_are_from_the_yaml_folder(root, tmp_path_factory, monkeypatch, capsys) -> None:
    (root / "configs").mkdir()
    (root / "configs" / "c.yaml").write_text(
        (root / write_config(root))
        .read_text()
        .replace("model: tiny-llama", "model: ../tiny-llama")
        .replace("[train.jsonl]", "[../train.jsonl]")
        .replace("[test.jsonl]", "[../test.jsonl]")
    )
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    assert train(str(root / "configs" / "c.yaml"), "--output-dir", "out") == 0
    assert "data: 20 training records" in capsys.readouterr().err
    assert main(["eval", "--adapter", "out/adapter"]) == 0  # the run's test file, found again
    captured = capsys.readouterr()
    assert set(json.loads(captured.out)) == {"default"} and "n=3" in captured.err


def test_merge_writes_a_plain_model_with_the_adapters_outputs(root, capsys) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    assert train(write_config(root, experts=1, training=", learning_rate: 0.05"), "--output-dir", "one") == 0
    assert main(["merge", "--adapter", "one/adapter", "merged"]) == 0
    moe, _, _ = demo.load_adapter_run("one/adapter", test_per_task=0)
    plain = AutoModelForCausalLM.from_pretrained(root / "merged")
    assert (root / "merged" / "tokenizer_config.json").is_file()
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        expected, merged = moe(input_ids=ids).logits, plain(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(root / "tiny-llama")(input_ids=ids).logits
    assert not torch.allclose(expected, base, atol=1e-4)  # the adapter changed something
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)

    capsys.readouterr()  # two experts, one per token: no single set of weights computes that
    assert train(write_config(root, experts=2), "--output-dir", "two") == 0
    capsys.readouterr()
    assert main(["merge", "--adapter", "two/adapter", "merged2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' loading bar
    assert err.startswith("moetune merge: error: ") and "merging needs one routed expert per layer" in err
    assert not (root / "merged2").exists()
    assert main(["merge", "--adapter", "one/adapter", "merged"]) == 2  # exists: --overwrite


def test_validation_during_training_and_the_best_checkpoint(root, capsys) -> None:
    """eval_strategy: steps with a validation split: a loss per task, their mean as eval_loss, the
    routing of the validation tokens, and load_best_model_at_end keeps the best step's adapter."""
    training = (
        ", max_steps: 4, learning_rate: 0.05, eval_strategy: steps, eval_steps: 1, save_strategy: steps, "
        "save_steps: 1, load_best_model_at_end: true, logging_steps: 1"
    )
    rows = [{"prompt": f"what is {i} + 1", "response": str(i + 1), "task": "add"} for i in range(10)]
    with open(root / "train.jsonl", "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(root, data="train: [train.jsonl], validation_split: 0.25", training=training)
    assert train(config, "--output-dir", "out") == 0
    err = capsys.readouterr().err
    assert "data: 7 validation records (add: 2, default: 5)" in err  # round(10 / 4), round(20 / 4)
    assert "data: 23 training records (add: 8, default: 15)" in err
    history = json.loads((root / "out" / "metrics.json").read_text())["log_history"]
    by_step: dict[int, dict] = {}
    for h in history:
        if any(k.startswith("eval_") for k in h):
            by_step.setdefault(h["step"], {}).update(h)
    assert sorted(by_step) == [1, 2, 3, 4]
    for h in by_step.values():
        assert h["eval_loss"] == pytest.approx((h["eval_add_loss"] + h["eval_default_loss"]) / 2)
        for task in ("add", "default"):  # top-1 routing: one expert per token
            assert h[f"eval_{task}_moe/effective_experts"] == pytest.approx(1.0)
            assert 1.0 <= h[f"eval_{task}_moe/effective_load"] <= 2.0
    best = min(by_step, key=lambda step: by_step[step]["eval_loss"])
    state = json.loads((root / "out" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_metric"] == pytest.approx(by_step[best]["eval_loss"])
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best}")
    kept = load_file(root / "out" / "adapter" / "moetune_model.safetensors")
    at_best = load_file(root / "out" / "checkpoints" / f"checkpoint-{best}" / "moetune_model.safetensors")
    assert kept.keys() == at_best.keys() and all(torch.equal(kept[k], at_best[k]) for k in kept)


def test_eval_strategy_without_validation_data_is_refused(root, capsys, model_loads) -> None:
    assert train(write_config(root, training=", eval_strategy: steps"), "--output-dir", "out") == 2
    assert capsys.readouterr().err.strip() == (
        "moetune train: error: training.eval_strategy='steps' needs validation data: data.validation files "
        "or data.validation_split"
    )
    assert model_loads == []


def test_generate_samples_reproducibly_and_checks_its_options_first(root, capsys, model_loads) -> None:
    assert train(write_config(root), "--output-dir", "out") == 0
    capsys.readouterr()
    loads = len(model_loads)
    assert main(["generate", "--adapter", "out/adapter", "--prompt", "hi", "--top-p", "0"]) == 2
    assert "--top-p 0.0: must be in (0, 1]" in capsys.readouterr().err
    assert len(model_loads) == loads  # refused before loading
    sample = ["generate", "--adapter", "out/adapter", "--prompt", "hi", "--max-new-tokens", "12"]
    outputs = []
    for seed in ("1", "1", "2"):
        assert main([*sample, "--temperature", "5", "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]  # the seed decides; a hot temperature varies the text


def _hub_cache(root, repo_id: str) -> dict[str, str]:
    """The tiny model saved as transformers' Hub cache holds a download: HF_HOME/hub/models--org--name/
    snapshots/<commit>/ and refs/main; the environment that makes transformers read it offline."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hf" / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(root / "tiny-llama", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1"}


def python(root, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    """`python ARGV` in a fresh process in `root` (HF_HUB_OFFLINE and the like are read at import)."""
    return subprocess.run(
        [sys.executable, *argv], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_hub_model_in_bf16_from_the_yaml_and_eval_finds_it(root) -> None:
    """`model: {name_or_path: <Hub id>, dtype: bfloat16}` loads through transformers from its cache
    (HF_HUB_OFFLINE=1), and `moetune eval` later loads the same base the same way."""
    env = _hub_cache(root, "moetune-test/tiny-llama")
    config = (root / write_config(root)).read_text()
    config = config.replace(
        "model: tiny-llama", "model: {name_or_path: moetune-test/tiny-llama, dtype: bfloat16}"
    )
    (root / "hub.yaml").write_text(config)
    run = python(root, env, "-m", "moetune", "train", "hub.yaml", "--output-dir", "out")
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((root / "out" / "adapter" / demo.RUN_FILE).read_text())
    assert record["model"] == "moetune-test/tiny-llama" and record["model_load"]["dtype"] == "bfloat16"
    evaluated = python(root, env, "-m", "moetune", "eval", "--adapter", "out/adapter")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert set(json.loads(evaluated.stdout)) == {"default"}


def test_model_mapping_errors_are_one_line(root, capsys, model_loads) -> None:
    cases = {
        "{name_or_path: tiny-llama, dtype: float8}": "model: dtype='float8': allowed: float32, bfloat16",
        "{name_or_path: tiny-llama, quantization: gptq}": "model: quantization='gptq': allowed: bnb-4bit",
        "{dtype: bfloat16}": "model: missing key 'name_or_path'",
        "{name_or_path: tiny-llama, revison: main}": "model: unknown key(s) ['revison']",
        "/nowhere/model": "model '/nowhere/model': no such local model directory",
    }
    for model, expected in cases.items():
        text = (root / write_config(root)).read_text().replace("model: tiny-llama", f"model: {model}")
        (root / "m.yaml").write_text(text)
        assert train("m.yaml", "--output-dir", "out") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (model, err)


def test_a_torchao_int8_base_from_the_yaml(root, capsys) -> None:
    pytest.importorskip("torchao")
    text = (root / write_config(root)).read_text()
    text = text.replace("model: tiny-llama", "model: {name_or_path: tiny-llama, quantization: torchao-int8}")
    (root / "q.yaml").write_text(text)
    assert train("q.yaml", "--output-dir", "out") == 0
    record = json.loads((root / "out" / "adapter" / demo.RUN_FILE).read_text())
    assert record["model_load"]["quantization"] == "torchao-int8"
    assert main(["eval", "--adapter", "out/adapter"]) == 0


def test_a_bitsandbytes_4bit_base_from_the_yaml(root) -> None:
    """QLoRA's NF4 with double quantization; bitsandbytes' CPU kernels need widths of 64 and more."""
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    wide = LlamaForCausalLM(LlamaConfig(**shape, head_dim=16, num_hidden_layers=2, vocab_size=128))
    wide.save_pretrained(root / "wide-llama")
    tiny_chat_tokenizer().save_pretrained(root / "wide-llama")
    text = (root / write_config(root)).read_text()
    text = text.replace("model: tiny-llama", "model: {name_or_path: wide-llama, quantization: bnb-4bit}")
    (root / "q.yaml").write_text(text)
    assert train("q.yaml", "--output-dir", "out") == 0
    assert main(["eval", "--adapter", "out/adapter"]) == 0


@pytest.mark.parametrize(
    "name", ["sft.yaml", "continual.yaml", "hub-bf16.yaml", "qlora.yaml", "hub-alpaca.yaml", "multi-gpu.yaml"]
)
def test_every_example_config_parses(name) -> None:
    from moetune.app.run_config import load_run_config

    examples = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples"
    )
    cfg = load_run_config(os.path.join(examples, name))
    for src in cfg.data.train + cfg.data.test + [s for st in cfg.stages for s in st.data.train]:
        assert src.dataset or os.path.isfile(src.path), src.path  # paths from the YAML's folder
    if name == "qlora.yaml":
        assert cfg.model_load.quantization == "bnb-4bit" and cfg.training["learning_rate"] == 2e-4
    if name == "hub-bf16.yaml":
        assert cfg.model == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.model_load.dtype == "bfloat16"
    if name == "hub-alpaca.yaml":
        assert cfg.data.train[0].dataset == "tatsu-lab/alpaca" and cfg.data.validation_split == 0.02


ALPACA = [
    {"instruction": f"Review: {w} film {i}", "input": "", "output": w, "text": "..."}
    for i in range(6)
    for w in WORDS
]


def test_datasets_in_every_record_format(root) -> None:
    """A local dataset directory (save_to_disk) in Alpaca format with an extra column, a ShareGPT file,
    a column mapping: each becomes the same kind of example, the loss on the answer."""
    import datasets

    from moetune.app.run_config import DataSource

    datasets.Dataset.from_list(ALPACA).save_to_disk(str(root / "alpaca-ds"))
    alpaca = DataSource(dataset=str(root / "alpaca-ds")).examples()
    assert len(alpaca) == 12 and alpaca[0].messages == (
        ("user", "Review: good film 0"),
        ("assistant", "good"),
    )
    sharegpt = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
            ]
        }
    ]
    (root / "sharegpt.jsonl").write_text(json.dumps(sharegpt[0]) + "\n")
    (ex,) = DataSource(path=str(root / "sharegpt.jsonl")).examples()
    assert ex.messages == (("system", "Be brief."), ("user", "hi"), ("assistant", "hello"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([{"q": "2 + 2", "a": "4", "id": 7}])}
    ).save_to_disk(str(root / "qa-ds"))
    (ex,) = DataSource(dataset=str(root / "qa-ds"), columns={"q": "prompt", "a": "response"}).examples()
    assert ex.messages == (("user", "2 + 2"), ("assistant", "4"))
    # a declared format is checked on every record
    assert len(DataSource(dataset=str(root / "alpaca-ds"), format="alpaca").examples()) == 12
    assert len(DataSource(path=str(root / "sharegpt.jsonl"), format="sharegpt").examples()) == 1
    with pytest.raises(ValueError, match=r"record 1: format='alpaca' needs the keys instruction and output"):
        DataSource(path=str(root / "sharegpt.jsonl"), format="alpaca").examples()
    with pytest.raises(ValueError, match=r"format='csv': allowed: prompt_response, messages, alpaca"):
        DataSource(path="x.jsonl", format="csv")


def test_dataset_mistakes_are_one_line(root, capsys, model_loads) -> None:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA)}).save_to_disk(str(root / "ds"))
    datasets.Dataset.from_list([{"question_text": "a", "reply": "b"}]).save_to_disk(str(root / "odd"))
    (root / "bad.jsonl").write_text(json.dumps({"conversations": [{"from": "bot", "value": "x"}]}) + "\n")
    capsys.readouterr()  # the datasets' progress bars
    cases = {
        "train: [{dataset: ds, split: validation}]": "no split 'validation'; it has ['train']",
        "train: [{dataset: ds, columns: {question: prompt}}]": "columns ['question'] not in the dataset",
        "train: [{dataset: odd}]": "needs a prompt (prompt/instruction/question) and a response",
        "train: [bad.jsonl]": "conversations: unknown speakers ['bot']",
    }
    for data, expected in cases.items():
        assert train(write_config(root, data=data), "--output-dir", "out") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (data, err)
    assert "no split 'validation'; it has ['train']" in _one_error(
        root, capsys, "train: [{dataset: ds, split: validation}]"
    )
    assert model_loads == []


def _one_error(root, capsys, data: str) -> str:
    assert train(write_config(root, data=data), "--output-dir", "out") == 2
    return capsys.readouterr().err


def test_a_hub_dataset_in_alpaca_format_from_the_cache(root) -> None:
    """`dataset: org/name` under HF_HUB_OFFLINE=1: read from the Hub cache's snapshot, as downloaded."""
    env = _hub_cache(root, "moetune-test/tiny-llama")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hf" / "hub" / "datasets--moetune-test--tiny-alpaca"
    (repo / "snapshots" / commit / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    rows = "".join(json.dumps(r) + "\n" for r in ALPACA)
    (repo / "snapshots" / commit / "data" / "train.jsonl").write_text(rows)
    config = write_config(root, data="train: [{dataset: moetune-test/tiny-alpaca, task: reviews}]")
    text = (root / config).read_text().replace("model: tiny-llama", "model: moetune-test/tiny-llama")
    (root / "hub.yaml").write_text(text)
    run = python(root, env, "-m", "moetune", "train", "hub.yaml", "--output-dir", "out")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "data: 12 training records (reviews: 12)" in run.stderr


def test_torchrun_two_processes_train_what_one_process_trains(root) -> None:
    """`torchrun --nproc_per_node 2 -m moetune train` (CPU, gloo) with 2 rows per process against one
    process with 4: the same global batches (a sequential sampler), plain SGD, no balance losses (those
    are per-process means), so the adapters agree to float rounding (tests/test_distributed.py: 1e-6).
    One output directory, written by rank 0."""

    def config(per_device: int) -> str:
        name = f"ddp{per_device}.yaml"
        (root / name).write_text(
            "model: tiny-llama\n"
            "moe: {num_experts: 2, top_k: 1, r: 2, lora_dropout: 0.0, aux_loss_coef: 0.0, "
            "z_loss_coef: 0.0}\n"
            "data: {train: [train.jsonl], max_length: 16}\n"
            f"training: {{per_device_train_batch_size: {per_device}, num_train_epochs: 1, optim: sgd, "
            "learning_rate: 0.5, max_grad_norm: 0.0, train_sampling_strategy: sequential, "
            "disable_tqdm: true}\n"
        )
        return name

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = python(root, env, "-m", "moetune", "train", config(4), "--output-dir", "one")
    assert one.returncode == 0, one.stderr[-2000:]
    launch = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "moetune")
    two = python(root, env, *launch, "train", config(2), "--output-dir", "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("training on 20 examples") == 1  # rank 0 logs
    a = load_file(root / "one" / "adapter" / "moetune_model.safetensors")
    b = load_file(root / "two" / "adapter" / "moetune_model.safetensors")
    assert a.keys() == b.keys()
    moved = max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k)
    assert moved > 1e-3  # training changed the experts (B starts at zero)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    steps = json.loads((root / "two" / "metrics.json").read_text())["log_history"][-1]["step"]
    assert steps == 5  # 20 records, global batch 4


def _mc_task(root, items, tokenizer) -> str:
    """A local lm-eval multiple-choice task over `items`, written as moetune scores options: the chat
    prompt as the context, each option with the end of turn as a choice, no delimiter between."""
    from moetune.app.data import end_of_turn, prompt_text

    end = end_of_turn(tokenizer)
    rows = [
        {
            "prompt": prompt_text(tokenizer, it.example.messages[:-1]),
            "choices": [o + end for o in it.options],
            "gold": it.options.index(it.example.response),
        }
        for it in items
    ]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "lm-tasks").mkdir(exist_ok=True)
    (root / "lm-tasks" / "mc.yaml").write_text(
        "task: moetune_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {root / 'mc.jsonl'}}}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: gold\n"
        'target_delimiter: ""\n'
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
    )
    return str(root / "lm-tasks")


def test_lm_eval_harness_scores_items_as_moetune_does(root, capsys) -> None:
    """lm-eval on a local multiple-choice task gives, item for item, moetune's own option
    log-likelihood verdicts (a random adapter, so that they vary); `moetune eval --harness` runs it."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import moetune
    from moetune.app.data import Example
    from moetune.app.evaluation import EvalItem, score_items

    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(0)
    model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(num_experts=2, top_k=1, r=2))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    options = ("good", "bad", "fine")
    items = [
        EvalItem(Example((("user", f"Review {i}: {w} film"), ("assistant", w))), options)
        for i in range(12)
        for w in options
    ]
    ours = score_items(model, tokenizer, items)
    tasks = _mc_task(root, items, tokenizer)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    out = simple_evaluate(
        model=lm, tasks=["moetune_mc"], task_manager=TaskManager(include_path=tasks), log_samples=True
    )
    theirs = {s["doc_id"]: bool(s["acc"]) for s in out["samples"]["moetune_mc"]}
    assert [theirs[i] for i in range(len(items))] == ours
    assert 0 < sum(ours) < len(ours)

    assert train(write_config(root), "--output-dir", "out") == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", "out/adapter", "--harness", "moetune_mc", "--include-path", tasks]) == 0
    results = json.loads(capsys.readouterr().out)
    assert 0.0 <= results["moetune_mc"]["acc,none"] <= 1.0
    assert (
        main(["eval", "--adapter", "out/adapter", "--harness", "no_such_task", "--include-path", tasks]) == 2
    )
    assert "unknown lm-eval task(s) ['no_such_task']" in capsys.readouterr().err


def test_missing_packages_and_remote_code_are_one_line(root, capsys, monkeypatch, model_loads) -> None:
    import importlib.util

    # a model whose config names its own code (auto_map): refused unless trust_remote_code
    custom = root / "custom-model"
    custom.mkdir()
    (custom / "config.json").write_text(
        json.dumps({"model_type": "my-own", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}})
    )
    text = (root / write_config(root)).read_text().replace("model: tiny-llama", "model: custom-model")
    (root / "remote.yaml").write_text(text)
    assert train("remote.yaml", "--output-dir", "out") == 2
    assert "set model.trust_remote_code: true if you trust that repository" in capsys.readouterr().err

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("bitsandbytes", "lm_eval") else real(name, *a),
    )
    text = (root / write_config(root)).read_text()
    (root / "q.yaml").write_text(
        text.replace("model: tiny-llama", "model: {name_or_path: tiny-llama, quantization: bnb-8bit}")
    )
    loads = len(model_loads)
    assert train("q.yaml", "--output-dir", "out") == 2
    assert "model.quantization='bnb-8bit': needs the bitsandbytes package" in capsys.readouterr().err
    assert main(["eval", "--adapter", "nowhere", "--harness", "arc_easy"]) == 2
    assert "--harness needs lm-eval-harness: pip install 'moetune[eval]'" in capsys.readouterr().err
    assert len(model_loads) == loads


def test_a_bf16_run_is_scored_in_bf16_and_eval_recomputes_it(root, capsys) -> None:
    """training.bf16: the Trainer's autocast, and the before/after scoring under the same autocast;
    `moetune eval` reads the precision from the run record and gives the same accuracies."""
    config = write_config(root, training=", bf16: true, learning_rate: 0.05")
    assert train(config, "--output-dir", "out") == 0
    record = json.loads((root / "out" / "adapter" / demo.RUN_FILE).read_text())
    assert record["autocast"] == "bfloat16"
    capsys.readouterr()
    assert main(["eval", "--adapter", "out/adapter"]) == 0
    after = json.loads((root / "out" / "metrics.json").read_text())["after"]
    assert json.loads(capsys.readouterr().out) == after


def test_every_help_page_prints(capsys) -> None:
    """`moetune --help` and each command's `--help` print (argparse %-formats help lines: a lone % in
    one of them broke the top-level page)."""
    from moetune.app.cli import build_parser, main

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    pages = {}
    for argv in (["--help"], *([name, "--help"] for name in commands)):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0, argv
        pages[argv[0]] = capsys.readouterr().out
        assert pages[argv[0]].startswith("usage: moetune") and "%%" not in pages[argv[0]], argv
    assert "95%" in " ".join(pages["--help"].split()) and "95% intervals" in " ".join(pages["eval"].split())
