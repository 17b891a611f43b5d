"""Running tests/helpers/ddp_worker.py under torchrun, and reading and comparing what its ranks wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tests.helpers import REPO as ROOT

ATOL = 1e-6


Run = dict[str, Any]  # "adapter": name -> tensor, "init": the adapter before training, "run": run.json


def load_run(rank_dir: Path) -> Run:
    return {
        "adapter": load_file(str(rank_dir / "moetune_model.safetensors")),
        "init": load_file(str(rank_dir / "init" / "moetune_model.safetensors")),
        "run": json.loads((rank_dir / "run.json").read_text()),
    }


def run_dir(spec: str) -> str:
    case, per_device, grad_accum, log_steps = spec.split(":")
    return f"{case}-b{per_device}-ga{grad_accum}-log{log_steps}"


DIST_ENV_PREFIXES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_",
    "TORCHELASTIC_",
    "ACCELERATE_",
)


def torchrun(worker_args: list[str], env: dict[str, str] | None = None) -> None:
    """`ddp_worker.py` under torchrun, 2 processes, in a clean environment (no rank variables inherited
    from the test process). One retry when a rank dies in C++ shutdown ("terminate called without an
    active exception", seen rarely under load after training finished): the rerun overwrites its files."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(DIST_ENV_PREFIXES)}
    env = keep | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"} | (env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += [str(ROOT / "tests" / "helpers" / "ddp_worker.py"), *worker_args]
    for attempt in range(2):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
        print(f"torchrun attempt {attempt + 1}: a rank aborted in shutdown; retrying", file=sys.stderr)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}"


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: str = "\0") -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a if skip not in k)
