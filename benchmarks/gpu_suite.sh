#!/usr/bin/env bash
# Every GPU check in one command: kernel correctness on the device, then timings against the
# best peers. Run from the repository root on a GPU machine; each step fails soft and the whole
# suite stays under 8 minutes on one H100/H200. Output also goes to $OUT/gpu_suite.log if set.
#
#   bash benchmarks/gpu_suite.sh            # on the GPU
#   bash benchmarks/gpu_suite.sh --dry-run  # same code, tiny shapes, Pallas interpret mode (CPU)
#   STEPS="gpu_flash_attention gpu_model" bash benchmarks/gpu_suite.sh   # a subset
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log=${OUT:-/tmp}/gpu_suite.log
{
  status=0
  echo "# gpu_suite $(date -u +%FT%TZ) $*"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
  for step in ${STEPS:-gpu_flash_attention gpu_paged_attention gpu_lora gpu_model nvila_prefill serve_throughput multi_lora train_mfu}; do
    echo; echo "## $step"
    start=$(date +%s)
    "$PY" "benchmarks/$step.py" "$@" || { echo "!! $step exited with $?"; status=1; }
    echo "## $step took $(( $(date +%s) - start )) s"
  done
  exit $status
} 2>&1 | tee "$log"
