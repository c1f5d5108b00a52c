#!/usr/bin/env bash
# On a GPU machine: build for sm_90, run every GPU test, then compute-sanitizer
# (memcheck, racecheck) on the small kernel cases. Logs go to $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/flashmoe-gpu}
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 >"$out/configure.log" 2>&1 \
  || { tail -20 "$out/configure.log"; exit 1; }
cmake --build build-gpu -j "$(nproc)" >"$out/build.log" 2>&1 || { grep -E "error" "$out/build.log" | head -30; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
./build-gpu/tests/flashmoe-tests-gpu --gtest_brief=1 2>&1 | tee "$out/gpu-tests.log" | grep -vE "^\[info\]" | tail -40
status=${PIPESTATUS[0]}
sanitize() {  # tool filter
  compute-sanitizer --tool "$1" --error-exitcode 9 ./build-gpu/tests/flashmoe-tests-gpu \
    --gtest_brief=1 --gtest_filter="$2" >"$out/sanitizer-$1.log" 2>&1
  echo "compute-sanitizer $1: exit $? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer-$1.log" | tail -1);" \
    "$(grep -oE 'PASSED.*[0-9]+ tests?' "$out/sanitizer-$1.log" | tr -dc '0-9') tests passed)"
}
e=ExpertsGpu/ExpertsGpuMatchesCpu.EveryOutput
# The experts' cases are named by shape: the small ones (T 1, 7, 300 and 333 at D <= 64),
# which include the heavy, padded and empty id patterns and both kernel widths.
experts="$e/T1_*:$e/T7_*:$e/T300_*:$e/T333_D1_*:$e/T333_D64_*"
small="RouterGpu.SmallShapes*:ModelGpuOps.Embedding*:RouterBalanceGpu.*:Dtypes/OpsGpu.*:$experts:ExpertsGpu.OutOfRange*:ExpertsGpu.TablesOnTwoStreams*:SideStreamGpu.*:LayerGpu.Fp32*:OptimGpu.Bitwise*:PhiloxGpu.*"
sanitize memcheck "$small"
sanitize racecheck "$small"
exit "$status"
