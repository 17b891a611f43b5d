#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: a speed check, then the GPU tests (at most ~10 minutes: 240 + 170 + 160 s).
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # from the repository root, in its environment
# Writes OUT_DIR (default $OUT, else gpu-check/): speed{,-1b}.{log,json}, pytest.log, junit.xml, summary.txt.
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

# 1. speed at the shapes people fine-tune (four decoder layers of Llama-3-8B at 4x2048 and Llama-3.2-1B at
#    8x2048) and on the two toy models (8x1024): moetune E=8 top-2 r=8 + attention LoRA r=8 against peft
#    LoRA r=16 on the same modules, bf16 base, float32 adapters; kernels per training step; at most 4 minutes
timeout 240 python3 benchmarks/gpu_speed.py --models llama3-8b-4l,llama3.2-1b-4l,small,ffn-heavy \
  --configs peft-lora-r16,moetune-ffn-e8 --repeats 10 --launches --out "$out/speed.json" 2>&1 | tee "$out/speed.log"
echo "gpu_speed.py (shapes): exit ${PIPESTATUS[0]}" | tee -a "$out/summary.txt"
# 2. at the 1B shape: E=64 against E=8, the mixlora package's E=8 (last: the slowest, and its failure costs
#    nothing else), and greedy generation (KV cache, 128 new tokens) at batch 1 and 16
timeout 170 python3 benchmarks/gpu_speed.py --models llama3.2-1b-4l --repeats 6 --generate 1,16 \
  --configs peft-lora-r16,moetune-ffn-e8,moetune-ffn-e64,mixlora-e8 --out "$out/speed-1b.json" 2>&1 | tee "$out/speed-1b.log"
echo "gpu_speed.py (1B: E=64, mixlora, generation): exit ${PIPESTATUS[0]}" | tee -a "$out/summary.txt"
# (each ffn dispatch forced, or bf16 adapters: gpu_speed.py --configs moetune-grouped-e64,... --adapter-dtype ...)

# 3. the CUDA-marked tests (tests/test_cuda.py: the other modules need packages the GPU image may lack)
timeout 160 python3 -m pytest tests/test_cuda.py -m cuda -p no:cacheprovider -rs -v --junitxml="$out/junit.xml" 2>&1 | tee "$out/pytest.log"
tests=${PIPESTATUS[0]}
echo "pytest -m cuda: exit $tests ($(tail -n 1 "$out/pytest.log"))" | tee -a "$out/summary.txt"
exit "$tests"
