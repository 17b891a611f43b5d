#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: a speed check, then the GPU tests (at most ~10 minutes).
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # from the repository root, in its environment
# Writes OUT_DIR (default $OUT, else gpu-check/): speed{,-bf16}.{log,json}, pytest.log, junit.xml, summary.txt.
# Each part runs under a time limit and the script goes on when one fails; the exit status is that of
# the tests. Needs torch with CUDA, transformers, accelerate, peft, pytest, and datasets and deepspeed
# (the test extra has them all). Where they cannot be installed, benchmarks/gpu_wheels.sh (run where
# PyPI is reachable) leaves the missing ones in .whl/, and this script installs them into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # moetune and tests/ without an install
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
out="${1:-${OUT:-gpu-check}}"  # the device tool brings $OUT back
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>/dev/null || echo "deepspeed: not installed"
} | tee "$out/summary.txt"

# 1. speed: moetune E=8/32/64 (each ffn dispatch forced at E=8 and E=64) against peft LoRA r=16, bf16,
#    float32 adapters, then bf16 adapters (the grouped GEMM's bf16 kernel); at most 6 minutes
configs=peft-lora-r16,moetune-ffn-e8,moetune-ffn-e32,moetune-ffn-e64
timeout 220 python3 benchmarks/gpu_speed.py --models small,ffn-heavy --batch 8 --seq 1024 --repeats 10 \
  --configs "$configs,moetune-dense-e8,moetune-dense-e64,moetune-grouped-e8,moetune-grouped-e64,moetune-sorted-e8,moetune-sorted-e64" \
  --out "$out/speed.json" 2>&1 | tee "$out/speed.log"
echo "gpu_speed.py: exit ${PIPESTATUS[0]}" | tee -a "$out/summary.txt"
timeout 120 python3 benchmarks/gpu_speed.py --models small,ffn-heavy --batch 8 --seq 1024 --repeats 10 \
  --configs "$configs,moetune-grouped-e8,moetune-grouped-e64" --adapter-dtype bfloat16 \
  --out "$out/speed-bf16.json" 2>&1 | tee "$out/speed-bf16.log"
echo "gpu_speed.py --adapter-dtype bfloat16: exit ${PIPESTATUS[0]}" | tee -a "$out/summary.txt"

# 2. the CUDA-marked tests (tests/test_cuda.py: the other modules need packages the GPU image may lack)
timeout 240 python3 -m pytest tests/test_cuda.py -m cuda -p no:cacheprovider -rs -v --junitxml="$out/junit.xml" 2>&1 | tee "$out/pytest.log"
tests=${PIPESTATUS[0]}
echo "pytest -m cuda: exit $tests ($(tail -n 1 "$out/pytest.log"))" | tee -a "$out/summary.txt"
exit "$tests"
