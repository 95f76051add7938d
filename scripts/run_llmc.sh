#!/usr/bin/env bash
# Usage: scripts/run_llmc.sh CONFIG [llmc options...]   e.g. scripts/run_llmc.sh configs/quickstart.yml --device cpu
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG [--set key=value ...] [--device cpu|cuda] [--overwrite]" >&2
    exit 2
fi
config=$1
shift
exec python -m llmc --config "$config" "$@"
