#!/usr/bin/env bash
# Run on a machine with PyPI before a GPU check: the Python packages that the GPU machines' image lacks
# (it has torch, transformers, accelerate, peft, pytest; nothing can be fetched there), as wheels in .whl/
# for Python 3.12, the versions this repository's tests ran with. Then, on the GPU machine, with .whl
# carried along: `bash benchmarks/gpu_check.sh` installs them into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl && mkdir .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8  # published as an sdist only: pure Python
du -sh .whl && ls .whl
