"""Tests that need a CUDA GPU (pytest marker `cuda`); without one they are skipped.

    python -m pytest -m cuda              # or `bash benchmarks/gpu_check.sh`, which also times a step

- The fast expert paths equal the slow per-expert reference on the GPU, in float32 and bf16, for `ffn`
  experts (dense, and grouped: `torch._grouped_mm` takes its CUTLASS kernel for bf16 on sm90 or newer and
  a loop of GEMMs otherwise) and `linear` experts.
- Inference without autograd (the attention LoRA's in-place add) equals the forward with autograd on,
  and the hidden's LoRA dropout mask drawn on the GPU has the right values and rate; with LoRA dropout
  the dense training path (gradients written over saved tensors) equals the sorted one.
- A few steps through MoETrainer with `bf16=True` (autocast): finite losses, the adapter moves, the
  routers stay float32.
- FSDP2 through `accelerate launch` with examples/accelerate/fsdp2.yaml, and DeepSpeed ZeRO-2/3 with
  examples/deepspeed/zero{2,3}.json under torchrun (skipped without deepspeed), each on one GPU (one
  process: the code paths, not the communication, which tests/test_distributed.py and
  tests/test_deepspeed.py check with 2 CPU processes): 5 steps of tests/helpers/ddp_worker.py, the adapter
  saved by `trainer.save_model`, a resume from the checkpoint of step 3, all equal to the same run on
  the CPU without sharding (1e-4: GPU and CPU kernels round differently; a mis-scaled loss is ~1e-2 off).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

import moetune
from moetune.io.adapter import WEIGHTS_NAME, adapter_state_dict
from moetune.train.trainer import MoETrainer
from tests.helpers import REPO, ddp_worker
from tests.helpers.distributed import DIST_ENV_PREFIXES, max_diff
from tests.helpers.numerics import max_rel_error, randomize_, run
from tests.helpers.tiny_models import tiny_batch, tiny_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (`pytest -m cuda` on one)"),
]

ROOT = REPO
GPU_ATOL = 1e-4

# (base dtype, adapter dtype, expert type, ffn dispatch)
PATHS = [
    (torch.float32, "auto", "ffn", "dense"),
    (torch.float32, "auto", "ffn", "grouped"),  # float32: torch's loop of GEMMs
    (torch.float32, "auto", "linear", "dense"),
    (torch.bfloat16, "auto", "ffn", "dense"),  # float32 adapters over a bf16 base
    (torch.bfloat16, "bfloat16", "ffn", "grouped"),  # the bf16 grouped GEMM kernel (sm90+)
    (torch.bfloat16, "auto", "linear", "dense"),
    (torch.float32, "auto", "ffn", "sorted"),  # slots sorted by expert (CPU inference's path), forced
    (torch.bfloat16, "bfloat16", "ffn", "sorted"),
]


@pytest.mark.parametrize(("base_dtype", "adapter_dtype", "expert_type", "dispatch"), PATHS, ids=str)
def test_fast_path_equals_reference_on_cuda(
    base_dtype: torch.dtype, adapter_dtype: str, expert_type: str, dispatch: str
) -> None:
    """Outputs and every gradient within 1e-4 (float32) or 5e-2 (bf16) of their largest value; the
    adapter moves the logits by far more. bf16 uses the soft router: two paths that round differently
    could otherwise pick different experts for a token whose k-th and (k+1)-th logits nearly tie."""
    bf16 = base_dtype == torch.bfloat16
    cfg = moetune.MoEConfig(
        expert_type=expert_type,
        router="soft" if bf16 else "topk",
        num_experts=4,
        top_k=2,
        r=8,  # rows of 16 bytes or more: the grouped GEMM's alignment
        lora_dropout=0.0,
        adapter_dtype=adapter_dtype,
    )
    model = moetune.get_moe_model(tiny_model("llama", dtype=base_dtype), cfg)
    randomize_(model)
    model.to("cuda")
    model._ctx.options.dispatch = dispatch
    if expert_type == "ffn":
        assert all(layer.uses_grouped() == (dispatch == "grouped") for _, layer in model.moe_layers())
    batch = {k: v.cuda() for k, v in tiny_batch("llama", batch=3, seq=9).items()}
    fast_out, fast_grads = run(model, batch, reference=False)
    ref_out, ref_grads = run(model, batch, reference=True)
    with torch.no_grad(), model.disable_adapter():
        base_out = model(**batch).logits.float()
    assert fast_out.device.type == "cuda" and fast_grads.keys() == ref_grads.keys()
    fast = {"logits": fast_out.float(), **{k: g.float() for k, g in fast_grads.items()}}
    ref = {"logits": ref_out.float(), **{k: g.float() for k, g in ref_grads.items()}}
    tol = 5e-2 if bf16 else 1e-4
    assert max_rel_error(fast, ref) < tol
    assert max_rel_error({"logits": base_out}, {"logits": ref["logits"]}) > 10 * tol


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inference_with_and_without_autograd_on_cuda(base_dtype: torch.dtype) -> None:
    """Without autograd the attention LoRA adds its B GEMM into the frozen output in place (float32
    adapters over a float32 base) and the `ffn` layers take the same fast path: the logits equal the
    forward with autograd on, on the GPU."""
    cfg = moetune.MoEConfig(num_experts=4, r=8, attn_r=4, lora_dropout=0.0)
    model = moetune.get_moe_model(tiny_model("llama", dtype=base_dtype), cfg)
    randomize_(model)
    model.to("cuda").eval()
    batch = {k: v.cuda() for k, v in tiny_batch("llama", batch=3, seq=9, padded=True).items()}
    with torch.no_grad():
        without = model(**batch).logits.float()
    with_autograd = model(**batch).logits.detach().float()
    tol = 5e-2 if base_dtype == torch.bfloat16 else 1e-5
    assert max_rel_error({"y": without}, {"y": with_autograd}) < tol


def test_hidden_dropout_mask_on_cuda() -> None:
    """The hidden's LoRA dropout mask drawn on the GPU: values 0 or 1 / (1 - p), about p of them 0,
    a different mask per draw."""
    cfg = moetune.MoEConfig(num_experts=4, r=8, lora_dropout=0.25)
    model = moetune.get_moe_model(tiny_model("llama"), cfg).to("cuda").train()
    layer = next(layer for _, layer in model.moe_layers())
    x_TD = torch.randn(256, layer.base_layer.up_proj.in_features, device="cuda")
    mask_TF, other_TF = layer._hidden_dropout_mask(x_TD), layer._hidden_dropout_mask(x_TD)
    assert mask_TF.device.type == "cuda" and mask_TF.shape == (256, layer.base_layer.down_proj.in_features)
    kept = mask_TF != 0
    torch.testing.assert_close(mask_TF[kept], torch.full_like(mask_TF[kept], 1 / 0.75))
    assert abs((~kept).float().mean().item() - 0.25) < 6 * (0.25 * 0.75 / mask_TF.numel()) ** 0.5
    assert not torch.equal(mask_TF, other_TF)


def test_dense_path_with_lora_dropout_equals_sorted_on_cuda() -> None:
    """Training with LoRA dropout on the GPU: the dense path (the hidden's mix and its h A^T in one
    node, whose backward writes h's gradient into the saved h ⊙ mask; SiluGLU's gradients written over
    gate and up) and the sorted path (separate ops) draw the same masks and give the same output and
    gradients."""
    cfg = moetune.MoEConfig(num_experts=4, r=8, lora_dropout=0.3)
    model = moetune.get_moe_model(tiny_model("llama"), cfg)
    randomize_(model)
    model.to("cuda").train()
    batch = {k: v.cuda() for k, v in tiny_batch("llama", batch=3, seq=9, padded=True).items()}
    results = {}
    for dispatch in ("dense", "sorted"):
        model._ctx.options.dispatch = dispatch
        torch.manual_seed(0)
        out, grads = run(model, batch, reference=False)
        assert out.device.type == "cuda"
        results[dispatch] = {"logits": out, **grads}
    assert max_rel_error(results["sorted"], results["dense"]) < 1e-5
    torch.manual_seed(1)
    other, _ = run(model, batch, reference=False)
    assert max_rel_error({"y": other}, {"y": results["sorted"]["logits"]}) > 1e-3  # the masks count


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps its device in a process-wide state: a GPU Trainer after CPU ones (use_cpu=True)
    would run on the CPU. Reset before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_adapter_initialisation_is_the_same_on_cuda() -> None:
    """One seed, one adapter: built over a base on the GPU (as under ZeRO-3's zero.Init), the experts,
    routers and attention LoRA are those built over the same base on the CPU."""
    cfg = moetune.MoEConfig(num_experts=4, r=8, attn_r=4, router="threshold", task_routing="task")
    adapters = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(1)
        model = moetune.get_moe_model(tiny_model("llama").to(device), cfg)
        adapters[device] = {k: v.cpu() for k, v in adapter_state_dict(model).items()}
    assert adapters["cpu"].keys() == adapters["cuda"].keys()
    assert max_diff(adapters["cuda"], adapters["cpu"]) == 0


def test_trainer_bf16_steps_on_cuda(tmp_path: Path, fresh_accelerate) -> None:
    model = moetune.get_moe_model(
        tiny_model("llama"), moetune.MoEConfig(num_experts=4, r=8, lora_dropout=0.0, attn_r=4)
    )
    init = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        bf16=True,
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    trainer = MoETrainer(model=model, args=args, train_dataset=ddp_worker.dataset())
    trainer.train()
    assert next(model.parameters()).device.type == "cuda"
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    assert all(math.isfinite(log["loss"]) and math.isfinite(log["moe/aux_loss"]) for log in logs)
    trained = adapter_state_dict(model)
    assert max_diff({k: v.cpu() for k, v in trained.items()}, init) > 1e-3
    routers = [k for k in trained if ".router.weight_blocks." in k]
    assert routers and all(trained[k].dtype == torch.float32 for k in routers)
    batch = {k: v.cuda() for k, v in tiny_batch("llama").items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(**batch)
    assert all(v.dtype == torch.float32 for v in model.aux_losses().values())  # fp32 router math


def _launch(cmd: list[str], env: dict[str, str]) -> None:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(DIST_ENV_PREFIXES)}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=keep | {"HF_HUB_OFFLINE": "1"} | env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, f"{cmd[:6]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter before ("init") and after ("trained") tests/helpers/ddp_worker.py's `plain:4:1:0` run
    in this process on the CPU."""
    out = tmp_path_factory.mktemp("cpu") / "plain-b4-ga1-log0" / "rank0"
    ddp_worker.main([str(out.parent.parent), "plain:4:1:0"])
    return {
        "init": load_file(str(out / "init" / WEIGHTS_NAME)),
        "trained": load_file(str(out / WEIGHTS_NAME)),
    }


def _check_run(run_dir: Path, cpu: dict[str, dict[str, torch.Tensor]], wrapped: str) -> None:
    # the same adapter to start from: drawn on the CPU also where the base already is on the GPU (ZeRO-3)
    assert max_diff(load_file(str(run_dir / "rank0" / "init" / WEIGHTS_NAME)), cpu["init"]) == 0
    reference = cpu["trained"]
    run = json.loads((run_dir / "rank0" / "run.json").read_text())
    assert run["wrapped"] == wrapped and run["steps"] == 5 and run["resumed_steps"] == 2
    resumed = load_file(str(run_dir / "rank0" / WEIGHTS_NAME))
    saved = load_file(str(run_dir / "trainer-save" / WEIGHTS_NAME))  # the uninterrupted run's
    for adapter in (resumed, saved):
        diff = max_diff(adapter, reference)
        assert diff <= GPU_ATOL, diff
    moetune.MoEModel.from_pretrained(tiny_model("llama"), run_dir / "trainer-save", strict=True)


def test_fsdp2_through_accelerate_on_one_gpu(tmp_path: Path, cpu_reference) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(ROOT / "examples" / "accelerate" / "fsdp2.yaml"), "--num_processes", "1"]
    cmd += ["--mixed_precision", "no", str(ROOT / "tests" / "helpers" / "ddp_worker.py"), "--cuda"]
    _launch([*cmd, str(tmp_path), "resume-plain:4:1:0"], {})
    _check_run(tmp_path / "resume-plain-b4-ga1-log0", cpu_reference, "FSDPMoEModel")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_on_one_gpu(tmp_path: Path, cpu_reference, stage: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone"]
    cmd += [str(ROOT / "tests" / "helpers" / "ddp_worker.py"), "--deepspeed", "--cuda"]
    _launch([*cmd, str(tmp_path), f"{stage}/resume-plain:4:1:0"], {})
    _check_run(tmp_path / f"zero{stage}-resume-plain-b4-ga1-log0", cpu_reference, "DeepSpeedEngine")
