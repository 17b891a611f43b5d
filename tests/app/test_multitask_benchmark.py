"""benchmarks/multitask.py: the --quick run writes a well-formed table and JSON; the protocol's pieces
(learning-rate choice on validation only, the grid's extension, the paired bootstrap, balanced splits)
by hand."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from tests.helpers import benchmark

multitask = benchmark("multitask")
multitask_data = benchmark("multitask_data")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("multitask"))
    assert multitask.main(["--quick", "--results-dir", out]) == 0
    with open(os.path.join(out, "multitask.json"), encoding="utf-8") as fh:
        data = json.load(fh)
    with open(os.path.join(out, "multitask.md"), encoding="utf-8") as fh:
        table = fh.read()
    return out, data, table


def test_quick_run_writes_every_run_and_a_summary(quick_results) -> None:
    out, data, table = quick_results
    methods = list(multitask.QUICK_METHODS)
    summary = data["summary"]
    assert set(summary["methods"]) == set(methods)
    assert summary["best_baseline"] in ("lora-r16", "dora-r16")
    tasks = list(multitask_data.TOY_TASKS)
    for run in data["runs"]:  # every run: its configuration, seed, rate, per-item results and times
        assert {
            "method",
            "lr",
            "seed",
            "protocol_id",
            "commit",
            "trainable_parameters",
            "step_seconds",
        } <= set(run)
        assert list(run["val"]) == tasks
        chosen = summary["methods"].get(run["method"], {}).get("lr") == run["lr"]
        if chosen or run["method"].startswith("scale-"):  # the test split: read only where reported
            assert list(run["test"]) == tasks
            assert all(set(s) <= {"0", "1"} and len(s) == 8 for s in run["test"].values())
        else:
            assert "test" not in run
        adapter = f"lr{run['lr']:g}-seed{run['seed']}"
        assert os.path.isdir(os.path.join(out, "adapters", run["method"], adapter))
        assert ("lora" in run) != ("moe" in run)
        assert run["steps"] == 2
    for name in methods:
        row = summary["methods"][name]
        grid = [r["lr"] for r in data["runs"] if r["method"] == name and r["seed"] == 0]
        assert {0.0005, 0.001, 0.002} <= set(grid)
        assert row["seeds"] == [
            0,
            1,
            2,
        ]  # the quick run has fewer than three moetune candidates: all get seeds
        assert 0.0 <= row["test_mean"] <= 1.0 and set(row["test_by_task"]) == set(tasks)
        assert row["trainable_parameters"] > 0
        if not row["baseline"]:
            vs = row["vs_best_baseline"]
            assert vs["ci95"][0] <= vs["difference"] <= vs["ci95"][1]
            assert 0.0 < row["routing"]["effective_experts"] <= 2.0 + 1e-9
            assert 0.0 <= row["routing"]["task_information"] <= 1.0 + 1e-9  # two tasks: at most 1 bit
    for name in methods:
        assert f"| {name}: " in table and f"| {name} | " in table  # summary row and per-task row
    # the untrained reference: moe-default's routing before training
    untrained = summary["untrained_routing"]
    assert 0.0 < untrained["effective_experts"] <= 2.0 + 1e-9 and 0.0 <= untrained["task_information"] <= 1.0
    assert "moe-default before training" in table
    # the timing phase: every reported method, a round of 3 steps each, the first not counted
    with open(os.path.join(out, "timing.json"), encoding="utf-8") as fh:
        timing = json.load(fh)
    assert set(timing["methods"]) == set(methods) and timing["skipped_steps"] == 1
    for name, rounds in timing["methods"].items():
        assert len(rounds) == 1 and len(rounds[0]["seconds"]) == 3 and min(rounds[0]["seconds"]) > 0
        row = summary["methods"][name]
        kept = rounds[0]["seconds"][1:]
        assert row["step_seconds_timed"] and min(kept) <= row["step_seconds"] <= max(kept)
        assert row["baseline"] or row["vs_best_baseline"]["step_time_ratio_timed"]
    rows = [
        line.split("|") for line in table.splitlines() if line.startswith(tuple(f"| {m}: " for m in methods))
    ]
    assert len(rows) == len(methods) and all(not cells[-3].strip().endswith("*") for cells in rows)
    assert set(summary["scaling"]) == {"scale-lora-r4", "scale-lora-r8", "scale-moe-e2", "scale-moe-e4"}
    assert os.path.getsize(os.path.join(out, "scaling.png")) > 1000
    runs_on_disk = [f for _, _, files in os.walk(os.path.join(out, "runs")) for f in files]
    assert len(runs_on_disk) == len(data["runs"])


def test_the_saved_adapter_scores_as_the_trained_model_did(quick_results) -> None:
    """The test split is scored from the adapter each run saves: reloaded, it must give the trained
    model's validation results item for item (baseline and moetune)."""
    out, data, _ = quick_results
    args = multitask.parse_args(["--quick", "--results-dir", out])
    proto = multitask.protocol(args)
    for run in data["runs"]:
        if run["seed"] != 0 or run["method"] not in ("lora-r16", "moe-default"):
            continue
        method = multitask.get_method(run["method"])
        model, tokenizer, splits = multitask.load_model_and_splits(proto)
        adapter = multitask.adapter_path(args, run["method"], run["lr"], 0)
        if method.baseline:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        else:
            from moetune.model import MoEModel

            model = MoEModel.from_pretrained(model, adapter, strict=True)
        assert multitask.score(model, tokenizer, splits, method, "val")["val"] == run["val"]


def test_quick_run_resumes_without_training_again(quick_results) -> None:
    out, data, _ = quick_results
    args = multitask.parse_args(["--quick", "--results-dir", out, "--max-runs", "0"])
    proto = multitask.protocol(args)
    state = {
        "protocol": proto,
        "protocol_id": multitask.protocol_id(proto),
        "runs": multitask.load_runs(args.runs_dir, multitask.protocol_id(proto)),
        "new": 0,
        "stopped": False,
    }
    assert len(state["runs"]) == len(data["runs"])
    multitask.sweep(args, state)
    assert state["new"] == 0 and not state["stopped"]


def _fake_run(name: str, lr: float, val: float, test: float, seed: int = 0) -> dict:
    def items(acc: float) -> dict[str, str]:
        return {"t": "1" * round(100 * acc) + "0" * (100 - round(100 * acc))}

    return {"method": name, "lr": lr, "seed": seed, "val": items(val), "test": items(test)}


def _state(runs: list[dict]) -> dict:
    return {"runs": {(r["method"], r["lr"], r["seed"]): r for r in runs}, "new": 0, "stopped": False}


def test_timing_some_methods_again(quick_results, tmp_path) -> None:
    """--phase timing --timing-methods: only those are timed (the file is replaced, nothing trains);
    the others' step times then come from their runs, marked * in the table."""
    out = str(tmp_path / "copy")
    shutil.copytree(quick_results[0], out)
    argv = ["--quick", "--results-dir", out, "--phase", "timing", "--timing-methods", "moe-default"]
    assert multitask.main([*argv, "--max-runs", "0"]) == 0
    with open(os.path.join(out, "timing.json"), encoding="utf-8") as fh:
        assert list(json.load(fh)["methods"]) == ["moe-default"]
    with open(os.path.join(out, "multitask.json"), encoding="utf-8") as fh:
        rows = json.load(fh)["summary"]["methods"]
    assert rows["moe-default"]["step_seconds_timed"] and not rows["lora-r16"]["step_seconds_timed"]
    assert not rows["moe-default"]["vs_best_baseline"]["step_time_ratio_timed"]  # its baseline: from runs
    with open(os.path.join(out, "multitask.md"), encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    cell = {line.split(":")[0][2:]: line.split("|")[-3].strip() for line in lines if line.startswith("| ")}
    assert cell["lora-r16"].endswith("*") and not cell["moe-default"].endswith("*")


def test_the_rate_is_chosen_on_validation_never_on_test() -> None:
    args = multitask.parse_args(["--methods", "lora-r16", "--max-runs", "0"])
    runs = [
        _fake_run("lora-r16", 5e-4, val=0.50, test=0.90),
        _fake_run("lora-r16", 1e-3, val=0.70, test=0.10),  # best on validation, worst on test
        _fake_run("lora-r16", 2e-3, val=0.60, test=0.80),
    ]
    state = _state(runs)
    assert multitask.choose_lr("lora-r16", args, state) == 1e-3
    assert multitask.chosen_rates(args, state) == {"lora-r16": 1e-3}


def test_a_best_rate_at_the_edge_extends_the_grid() -> None:
    args = multitask.parse_args(["--methods", "lora-r16", "--max-runs", "0"])
    runs = [_fake_run("lora-r16", lr, val=v, test=0.5) for lr, v in ((5e-4, 0.5), (1e-3, 0.6), (2e-3, 0.7))]
    state = _state(runs)
    assert multitask.choose_lr("lora-r16", args, state) is None  # 4e-3 is needed and --max-runs 0 stops
    assert state["stopped"]
    assert multitask.chosen_rates(args, state) == {}  # no rate while the grid is to extend
    state = _state([*runs, _fake_run("lora-r16", 4e-3, val=0.65, test=0.5)])
    assert multitask.choose_lr("lora-r16", args, state) == 2e-3
    assert multitask.chosen_rates(args, state) == {"lora-r16": 2e-3}


def test_paired_bootstrap_by_hand() -> None:
    same = [{"a": "0110", "b": "10"}, {"a": "1111", "b": "00"}]
    assert multitask.paired_bootstrap(same, same, replicates=50) == (0.0, 0.0, 0.0)
    ones = [{"a": "1111", "b": "11"}] * 2
    zeros = [{"a": "0000", "b": "00"}] * 2
    assert multitask.paired_bootstrap(ones, zeros, replicates=50) == (1.0, 1.0, 1.0)
    # task a: +1 on half the items, task b: 0; the mean over tasks is (0.5 + 0) / 2
    point, low, high = multitask.paired_bootstrap([{"a": "1100", "b": "10"}], [{"a": "0000", "b": "10"}])
    assert point == pytest.approx(0.25) and 0.0 <= low < 0.25 < high <= 0.5
    assert multitask.mean_accuracy({"a": "1100", "b": "1"}) == pytest.approx(0.75)


def test_balanced_splits_take_the_options_in_turn() -> None:
    pairs = [(f"q{i}", "Yes") for i in range(10)] + [(f"r{i}", "No") for i in range(3)]
    picked = multitask_data._balanced(pairs, 8, ("Yes", "No"), random.Random(0))
    answers = [a for _, a in picked]
    assert len(picked) == 8 and answers.count("No") == 3 and answers.count("Yes") == 5  # No runs out
    with pytest.raises(ValueError, match="Maybe"):
        multitask_data._balanced([("q", "Maybe")], 1, ("Yes", "No"), random.Random(0))


def test_held_aside_tasks_are_not_in_the_benchmark() -> None:
    datasets = {spec.dataset for spec in multitask_data.GYM_TASKS.values()}
    assert not datasets & set(multitask_data.HELD_ASIDE)
    assert len(multitask_data.TASKS) >= 10


def test_every_method_builds_on_a_tiny_model() -> None:
    """Every configuration of the comparison builds its adapter (a typo in a method fails here, not
    after hours of sweep); task-routed ones route each task's samples to that task's mixture."""
    from peft import LoraConfig, get_peft_model

    from moetune.model import get_moe_model

    tasks = ["a", "b", "c"]
    for name, method in multitask.METHODS.items():
        model, _ = multitask_data.tiny_llama_and_tokenizer()
        if method.baseline:
            model = get_peft_model(model, LoraConfig(**multitask.lora_fields(method, matched_rank=8)))
        else:
            model = get_moe_model(model, multitask.moe_config(method, model.config, tasks))
            assert (model.moe_config.task_routing != "none") == method.route_by_task, name
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable > 0, name
        ids = torch.randint(0, 100, (2, 5))
        kwargs = {"task_ids": ["a", "c"]} if method.route_by_task else {}
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
        assert torch.isfinite(loss), name
    layers = model.config.num_hidden_layers
    assert multitask._mola(8) == [2, 2, 4, 4, 6, 6, 8, 8] and len(multitask._mola(layers)) == layers


def test_a_subset_of_methods_still_reports_every_method_on_disk(quick_results, tmp_path) -> None:
    out = str(tmp_path / "copy")
    shutil.copytree(quick_results[0], out)
    assert multitask.main(["--quick", "--results-dir", out, "--phase", "grid", "--methods", "lora-r16"]) == 0
    with open(os.path.join(out, "multitask.json"), encoding="utf-8") as fh:
        data = json.load(fh)
    assert list(data["methods"]) == list(multitask.QUICK_METHODS)
    assert data["summary"] == quick_results[1]["summary"]
