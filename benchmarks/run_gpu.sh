#!/usr/bin/env bash
# The GPU checks of issue 13 in one go, for a CUDA machine (H100/H200): the tests marked gpu, then the
# GPT-2 small benchmark eager, compiled and with fused optimizers. Each part has a time limit, so a hang
# cannot eat the session.
#
#   benchmarks/run_gpu.sh                 # the default parts, with .venv/bin/python if there is one
#   benchmarks/run_gpu.sh tests eager     # some parts: tests (<= 4 min), eager (<= 3), fused (<= 3),
#                                         # step (<= 1.5), fp8 (<= 3), compiled (<= 7)
#
# The parts run in that order, most needed first; the default is tests, eager, fused and step (their limits
# add up to 11.5 min): a session with 15 minutes of device time runs `fp8` (FP8 vs bf16-master, issue 22) and
# then `compiled` in a second call, if time is left.
#   PYTHON=python3 benchmarks/run_gpu.sh  # with a python that already has torch with CUDA (no install)
#
# Writes benchmarks/results/bench_cuda.json, bench_cuda_fused.json, step_overhead_cuda.json,
# bench_cuda_fp8.json and bench_cuda_compiled.json; if OUT
# is set, copies them and the logs there. Exit status: the number of parts that failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOGS=${OUT:-benchmarks/results}
failed=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || failed=$((failed + 1))
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    || exit 99

parts=" ${*:-tests eager fused step} "
if [[ $parts == *" tests "* ]]; then
    timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rs tests 2>&1 | tee "$LOGS/gpu_tests.log" \
        || failed=$((failed + 1))
fi
if [[ $parts == *" eager "* ]]; then
    timeout 180 "$PYTHON" benchmarks/bench_train.py --device cuda --steps 20 --warmup 3 2>&1 \
        | tee "$LOGS/bench_cuda.log" || failed=$((failed + 1))
fi
if [[ $parts == *" fused "* ]]; then
    # Fused optimizers on every side: GradScaler and mp.step(sync=False) skip overflows on the device, no sync.
    timeout 180 "$PYTHON" benchmarks/bench_train.py --device cuda --fused --steps 20 --warmup 3 2>&1 \
        | tee "$LOGS/bench_cuda_fused.log" || failed=$((failed + 1))
fi
if [[ $parts == *" step "* ]]; then
    timeout 90 "$PYTHON" benchmarks/bench_step.py --device cuda --iters 30 2>&1 \
        | tee "$LOGS/step_overhead_cuda.log" || failed=$((failed + 1))
fi
if [[ $parts == *" fp8 "* ]]; then
    # FP8 (issue 22): native torch._scaled_mm (tensorwise, delayed, rowwise) against bf16-master, GPT-2 small.
    timeout 180 "$PYTHON" benchmarks/bench_train.py --device cuda --steps 20 --warmup 3 \
        --policies bf16-master,fp8-tensorwise,fp8-delayed,fp8-rowwise --out benchmarks/results/bench_cuda_fp8.json \
        2>&1 | tee "$LOGS/bench_cuda_fp8.log" || failed=$((failed + 1))
fi
if [[ $parts == *" compiled "* ]]; then
    # Compiling takes most of this part (tens of seconds per policy): the policies the goals name.
    timeout 420 "$PYTHON" benchmarks/bench_train.py --device cuda --compile --steps 20 --warmup 3 \
        --policies fp32,amp-fp16,amp-bf16,f16-master,bf16-master 2>&1 | tee "$LOGS/bench_cuda_compiled.log" \
        || failed=$((failed + 1))
fi

if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/bench_cuda*.json benchmarks/results/step_overhead_cuda.json "$OUT"/ 2>/dev/null || true
fi
echo "run_gpu.sh: $failed part(s) failed"
exit "$failed"
