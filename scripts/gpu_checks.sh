#!/usr/bin/env bash
# The GPU checks, as one run on a CUDA machine that has torch and Triton but no vLLM and no package registry
# (how the team's lent GPU machines are): the encoder equivalence cases with the Triton and torch backends on
# CUDA, the plugin's device-to-host copy path, and the GPU encoder bench with the Triton launch sweep.
#
#     scripts/gpu_checks.sh            # logs under $OUT (default /tmp/gpu_checks)
#     GPU_CHECKS=bench scripts/gpu_checks.sh   # only some of: tests emitter bench
#
# Time (H200, session 25): the tests are mostly Triton compiles, one per kernel variant; with the group-maxima
# selection's unrolled radix select they ran past 150 s (24 of ~70 cases done), so TEST_TIMEOUT defaults to
# 420 s. The bench with --sweep takes ~2 min. A device call allows 600 s: give tests and bench a call each.
#
# Without the install the repository's folders are assembled into a `circuitwatch` package in a temporary
# directory (as pyproject's package-dir maps them), and commands run from there so that the repository's own
# `circuitwatch/` folder does not shadow it.
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/gpu_checks}
mkdir -p "$out"
pkg=$(mktemp -d)
cp -r "$repo/circuitwatch" "$pkg/circuitwatch"
ln -s "$repo/kernels" "$pkg/circuitwatch/kernels"
mkdir "$pkg/circuitwatch/plugin"
cp "$repo/plugin/__init__.py" "$repo/plugin/device_copy.py" "$pkg/circuitwatch/plugin/"
export PYTHONPATH=$pkg PYTHONUNBUFFERED=1
cd "$pkg" || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
status=0
checks=" ${GPU_CHECKS:-tests emitter bench} "
[[ $checks == *" tests "* ]] && { CIRCUITWATCH_TEST_BACKENDS=triton,torch CIRCUITWATCH_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-420}" \
    python3 -m pytest -q -p no:cacheprovider --rootdir "$repo" "$repo/tests/kernels/test_encoder_backends.py" \
    -k "architectures or ties or k_up_to or column_view or bf16 or radix" >"$out/tests.log" 2>&1 || status=1
    tail -n 30 "$out/tests.log"; }
[[ $checks == *" emitter "* ]] && {
    set -o pipefail; timeout 120 python3 "$repo/scripts/gpu_emitter_check.py" 2>&1 | tee "$out/emitter.log" || status=1; }
[[ $checks == *" bench "* ]] && {
    timeout "${BENCH_TIMEOUT:-300}" python3 "$repo/bench/encoder_bench.py" --gpu ${BENCH_ARGS:---sweep} 2>&1 |
    tee "$out/bench.log"; }
exit $status
