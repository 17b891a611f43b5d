"""Ctrl-C and kill -9 during `moetune train`: a complete checkpoint, a clean exit, an exact resume.

A tiny llama and tokenizer saved to a directory, tiny JSONL data and a YAML config make a real
`moetune train` run of 8 optimizer steps (checkpoints every 2). The interrupted runs are subprocesses
(tests/helpers/interrupt_worker.py pauses them at a known point); the uninterrupted reference and the resumed
runs go through `moetune.app.cli.main` in this process. The resumed adapter must equal the reference
bitwise (dropout, router jitter and the expert bias all on: the RNG state and the bias come back).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moetune.app.cli import main
from moetune.train import checkpoints
from tests.helpers import REPO
from tests.helpers.tiny_models import tiny_chat_tokenizer, tiny_model

CONFIG = """\
model: {model}
seed: 3
moe: {{num_experts: 4, top_k: 2, r: 4, lora_dropout: 0.1, router_jitter: 0.1, bias_update_rate: 0.01}}
data:
  train: [{train}]
  test: [{test}]
  max_length: 24
  options: {{sentiment: [positive, negative]}}
training:
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 2
  learning_rate: 0.005
  max_steps: 8
  save_strategy: steps
  save_steps: 2
  logging_steps: 4
  disable_tqdm: true
"""


def records(n: int, rng: random.Random) -> str:
    lines = []
    for _ in range(n):
        word = rng.choice(["good", "bad"])
        label = "positive" if word == "good" else "negative"
        prompt = f"Review: {word} film {rng.randint(0, 99)}"
        lines.append(json.dumps({"prompt": prompt, "response": label, "task": "sentiment"}))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    """The config and the adapter of an uninterrupted run."""
    root = tmp_path_factory.mktemp("interrupt")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    tiny_chat_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    (root / "train.jsonl").write_text(records(64, rng))
    (root / "test.jsonl").write_text(records(4, rng))
    text = CONFIG.format(model=root / "model", train=root / "train.jsonl", test=root / "test.jsonl")
    (root / "run.yaml").write_text(text)
    no_saves = text.replace("save_strategy: steps", "save_strategy: 'no'").replace("  save_steps: 2\n", "")
    (root / "no-saves.yaml").write_text(no_saves)
    assert main(["train", str(root / "run.yaml"), "--output-dir", str(root / "reference")]) == 0
    return {
        "root": root,
        "config": root / "run.yaml",
        "no_saves": root / "no-saves.yaml",
        "reference": root / "reference",
    }


def start(config: Path, out: Path, mode: str) -> subprocess.Popen:
    argv = ["train", str(config), "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tests.helpers.interrupt_worker", mode, *argv]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "ready").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "the worker never reached its pause"
        time.sleep(0.05)
    return proc


def assert_same_adapter(a: Path, b: Path) -> None:
    expected = load_file(str(a / "adapter" / "moetune_model.safetensors"))
    got = load_file(str(b / "adapter" / "moetune_model.safetensors"))
    assert expected.keys() == got.keys()
    assert any("expert_bias" in k and expected[k].abs().sum() > 0 for k in expected)  # the bias moved
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes(project, capsys) -> None:
    """The config saves no checkpoints of its own: the one Ctrl-C writes is all there is."""
    out = project["root"] / "ctrl-c"
    proc = start(project["no_saves"], out, "after-step:3")
    proc.send_signal(signal.SIGINT)
    (out / "go").touch()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    ckpt = out / "checkpoints" / "checkpoint-3"  # the step that was running when Ctrl-C came
    assert last.startswith(f"moetune train: interrupted at step 3; checkpoint saved in {ckpt}; resume with: ")
    assert checkpoints.is_complete(ckpt) and len(checkpoints.checkpoints(ckpt.parent)) == 1
    assert not (out / "adapter").exists()
    command = shlex.split(last.split("resume with: ", 1)[1])
    assert command[0] == "moetune" and command[-1] == "--resume"
    assert main(command[1:]) == 0
    assert f"resuming from {ckpt}" in capsys.readouterr().err
    assert_same_adapter(project["reference"], out)


def test_kill_9_while_saving_resumes_from_the_last_complete_checkpoint(project, capsys) -> None:
    out = project["root"] / "kill-9"
    proc = start(project["config"], out, "in-save:6")
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    half = out / "checkpoints" / "checkpoint-6"
    assert (half / "optimizer.pt").exists() and not checkpoints.is_complete(half)
    assert main(["train", str(project["config"]), "--output-dir", str(out), "--resume"]) == 0
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-4'}" in capsys.readouterr().err
    assert checkpoints.is_complete(half)  # written again, completely
    assert_same_adapter(project["reference"], out)


def test_resume_without_a_checkpoint_is_one_error_line(project, capsys) -> None:
    out = project["root"] / "nothing"
    assert main(["train", str(project["config"]), "--output-dir", str(out), "--resume"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert lines == [f"moetune train: error: --resume: no complete checkpoint in {out / 'checkpoints'}"]
