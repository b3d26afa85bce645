#!/usr/bin/env bash
# One shot on a GPU machine, under 8 minutes in all, everything into OUTDIR:
#   1. record the GPU and the torch / Triton versions; install fastres (no index needed)
#   2. correctness on CUDA: every config fastres picks for ResNet-50 at batch 1, 32 and 256
#      against PyTorch (benchmarks/check_configs.py; a failure stops the run), then pytest
#      tests (time-boxed)
#   3. the benchmark subset that matters most, bf16, batch 256, peaks measured in each stage:
#      a. inference: ResNet-50's distinct convs and blocks; eager channels_last, torch.compile,
#         fastres (max-autotune rows last, while time is left)
#      b. training step (fwd+bwd) of ResNet-50's blocks: eager channels_last vs fastres
# Outputs: run_gpu.log (everything), tests.xml, and per stage (inference/, train/):
# bench.json (pytest-benchmark), results.json + table.md + plot.png (the harness; rebuild with
# python -m benchmarks.report). On the device tool, whose $OUT returns at most 8 files, run it
# into a scratch folder and pack it: `bash benchmarks/run_gpu.sh /tmp/r; tar czf $OUT/r.tgz -C /tmp/r .`
set -uo pipefail
OUT=${1:?usage: benchmarks/run_gpu.sh OUTDIR}
TOTAL_S=${FASTRES_GPU_BUDGET_S:-465}   # the whole script
TESTS_S=${FASTRES_GPU_TESTS_S:-150}    # the correctness stage at most
CHECK_S=${FASTRES_GPU_CHECK_S:-120}    # the picked-configs check at most
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee "$OUT/run_gpu.log") 2>&1
unset TRITON_INTERPRET
start=$SECONDS

echo "== $(date -u +%FT%TZ) fastres run_gpu.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nvidia-smi -L
python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"

echo "== install"
importable() { (cd "$OUT" && python -c "import fastres.kernels.conv, fastres; print('fastres from', fastres.__file__)"); }
# fastres/kernels is a symlink to kernels/; a copy of the tree that dropped it gets it back.
[ -e fastres/kernels/conv.py ] || { rm -rf fastres/kernels; ln -s ../kernels fastres/kernels; }
pip install --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 \
    || { echo "editable install failed:"; tail -20 "$OUT/pip.log"; }
if ! importable; then  # fall back: a regular install, then the source tree on PYTHONPATH
    echo "fastres not importable after the editable install; trying a regular install"
    pip install --no-deps --no-build-isolation . >> "$OUT/pip.log" 2>&1 || tail -20 "$OUT/pip.log"
    importable || { export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; echo "using PYTHONPATH=$PYTHONPATH"; }
    importable || { echo "fastres cannot be imported: stopping before any GPU time is spent"; exit 1; }
fi

echo "== every config fastres picks for ResNet-50 (batch 1, 32, 256, bf16) against PyTorch"
# Before anything is timed: a flattened-loop miscompile (seen at 8 warps in some Triton
# versions) would make every timing below meaningless.
timeout -s INT -k 10 "$CHECK_S" python -m benchmarks.check_configs --network resnet50 \
    --batches 1,32,256 --dtype bf16
check=$?
echo "check_configs exit status: $check"
if (( check != 0 )); then echo "a picked config is wrong on this GPU: stopping before timing"; exit 1; fi

echo "== correctness on CUDA (at most ${TESTS_S}s)"
timeout -s INT -k 10 "$TESTS_S" python -m pytest tests -q -p no:cacheprovider \
    --junitxml="$OUT/tests.xml" \
    --deselect tests/test_benchmarks_quick.py::test_quick_rows_have_extra_info \
    --deselect tests/test_benchmarks_quick.py::test_quick_flops_are_the_reference_convs \
    --deselect tests/test_benchmarks_quick.py::test_report_rebuilds_table_and_plot
echo "tests exit status: $? (124 or 130: time box reached)"

bench() {  # bench STAGE SECONDS_FOR_THIS_STAGE harness-args...
    local stage=$1 budget=$2; shift 2
    local left=$(( TOTAL_S - (SECONDS - start) ))
    (( budget > left )) && budget=$left
    mkdir -p "$OUT/$stage"
    local json=(--benchmark-json "$OUT/$stage/bench.json" --benchmark-columns median,min,max,rounds
                --benchmark-sort name)
    python -c "import pytest_benchmark" 2>/dev/null || json=()
    echo "== benchmarks: $stage (${budget}s; rows starting after $(( budget - 60 ))s are skipped)"
    timeout -s INT -k 15 $(( budget - 10 )) python -m pytest benchmarks -q -p no:cacheprovider \
        --batches 256 --dtypes bf16 --bench-deadline $(( budget - 60 )) \
        --bench-out "$OUT/$stage" "${json[@]}" "$@"
    echo "benchmarks ($stage) exit status: $?"
}
TRAIN_S=110  # kept back for stage b
bench inference $(( TOTAL_S - (SECONDS - start) - TRAIN_S )) --units convs,blocks \
    --modes inference --providers eager_channels_last,compile,fastres,compile_max_autotune
bench train "$TRAIN_S" --units blocks --modes train --providers eager_channels_last,fastres
echo "== done in $(( SECONDS - start ))s; outputs in $OUT"
ls -lR "$OUT"
