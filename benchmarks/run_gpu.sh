#!/usr/bin/env bash
# Every benchmark on the accelerator in one command; each script prints its markdown table.
#   bash benchmarks/run_gpu.sh              # refuses to run without a GPU
#   bash benchmarks/run_gpu.sh --allow-cpu --tiny   # the smoke run on a CPU
# PYTHON (default python3) must import seqppl: see docs/installation.md for the offline
# install on a machine without a package index.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
allow_cpu=0
args=()
for arg in "$@"; do
  if [[ $arg == --allow-cpu ]]; then allow_cpu=1; else args+=("$arg"); fi
done
if ! "$python" -c 'import seqppl' 2>/dev/null; then
  echo "run_gpu.sh: $python cannot import seqppl; set PYTHON to the environment's python" >&2
  exit 2
fi
platform=$("$python" -c 'import jax; print(jax.devices()[0].platform)')
if [[ $platform != gpu && $allow_cpu == 0 ]]; then
  echo "run_gpu.sh: jax sees no GPU (platform: $platform); pass --allow-cpu to run anyway" >&2
  exit 2
fi
"$python" -c 'import jax; print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}")'
for script in benchmarks/bench_*.py; do
  echo
  echo "## $(basename "$script")"
  "$python" "$script" ${args[@]+"${args[@]}"}
done
