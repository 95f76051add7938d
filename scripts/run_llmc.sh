#!/usr/bin/env bash
# Usage: scripts/run_llmc.sh [--nproc N] CONFIG [llmc options...]
#   scripts/run_llmc.sh configs/quickstart.yml --device cpu
#   scripts/run_llmc.sh --nproc 2 configs/quantization/methods/GPTQ/gptq_w_only.yml   # data parallel (torchrun)
set -euo pipefail
nproc=1
if [ "${1:-}" = "--nproc" ]; then
    nproc=${2:?--nproc needs a number of processes}
    shift 2
fi
if [ $# -lt 1 ]; then
    echo "usage: $0 [--nproc N] CONFIG [--set key=value ...] [--device cpu|cuda] [--overwrite] [--resume]" >&2
    exit 2
fi
config=$1
shift
if [ "$nproc" -gt 1 ]; then
    exec python -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m llmc --config "$config" "$@"
fi
exec python -m llmc --config "$config" "$@"
