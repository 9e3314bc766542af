#!/usr/bin/env bash
# bash benchmarks/gpu_wheels.sh      (here, before a GPU session: see benchmarks/gpu_check.sh)
# Downloads into .whl/ the wheels brainscale needs that the lent GPU image lacks (it has jax
# with CUDA, flax, optax, orbax, tensorstore, scipy, absl, etils, protobuf; Python 3.12),
# at requirements.txt's versions, and keeps .whl/ out of git.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
pin() { grep -i "^$1==" requirements.txt | head -1; }
for package in grain array-record ml-collections clu av; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$(pin "$package")"
done
python3 -m pip download --quiet --no-deps --only-binary=:all: -d .whl portpicker==1.6.0
ls -la .whl
