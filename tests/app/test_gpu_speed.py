"""benchmarks/gpu_speed.py runs its whole table on the CPU (`--device cpu`, a smoke test): training,
inference, kernel (here: aten op) counts and greedy generation, for peft LoRA and moetune."""

from __future__ import annotations

import json

from tests.helpers import benchmark

gpu_speed = benchmark("gpu_speed")


def test_the_table_runs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "speed.json"
    argv = ["--device", "cpu", "--models", "small", "--batch", "1", "--seq", "8", "--warmup", "0"]
    argv += ["--repeats", "1", "--launches", "--generate", "2", "--new-tokens", "3", "--prompt", "4"]
    results = gpu_speed.main([*argv, "--configs", "peft-lora-r16,moetune-ffn-e8", "--out", str(out)])
    peft, moe = results["small"]["peft-lora-r16"], results["small"]["moetune-ffn-e8"]
    for r in (peft, moe):
        assert r["train"] > 0 and r["infer"] > 0 and r["generate_b2_tok_s"] > 0
        assert (r["batch"], r["seq"]) == (1, 8)
    assert moe["launches"] > peft["launches"] > 0  # the routers' ops come on top of the same model's
    assert moe["trainable"] > peft["trainable"]
    assert json.loads(out.read_text())["results"]["small"]["moetune-ffn-e8"]["launches"] == moe["launches"]
    table = capsys.readouterr().out
    assert "| moetune-ffn-e8 |" in table and "gen b=2 tok/s" in table


def test_the_mixlora_package_row(capsys):
    """The mixlora package trains and infers in the table (no generation: its row shows '-'), and the
    ratio of moetune's E=8 training step to its own is printed."""
    argv = ["--device", "cpu", "--models", "small", "--batch", "1", "--seq", "8", "--warmup", "0"]
    argv += ["--repeats", "1", "--generate", "2", "--new-tokens", "2", "--prompt", "4"]
    results = gpu_speed.main([*argv, "--configs", "peft-lora-r16,moetune-ffn-e8,mixlora-e8"])
    mixlora = results["small"]["mixlora-e8"]
    assert mixlora["train"] > 0 and mixlora["infer"] > 0 and "generate_b2_tok_s" not in mixlora
    assert mixlora["trainable"] > results["small"]["peft-lora-r16"]["trainable"]
    out = capsys.readouterr().out
    assert "| mixlora-e8 |" in out and "training step / the mixlora package's E=8:" in out


def test_the_fine_tuning_shapes_and_their_batches():
    assert gpu_speed.GPU_MODELS["llama3-8b-4l"]["intermediate_size"] == 14336
    assert gpu_speed.GPU_MODELS["llama3.2-1b-4l"]["hidden_size"] == 2048
    args = gpu_speed.argparse.Namespace(batch=None, seq=None)
    assert gpu_speed.shape_of("llama3-8b-4l", args) == (4, 2048)
    assert gpu_speed.shape_of("small", args) == (8, 1024)
    assert gpu_speed.shape_of("small", gpu_speed.argparse.Namespace(batch=2, seq=None)) == (2, 1024)
