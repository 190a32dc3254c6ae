#!/usr/bin/env bash
# Speed benchmarks (not tests): environment throughput, evaluation latency, dataset build time, and the
# milliseconds per update round of every algorithm, and the attainable matmul rates at the critic's shapes
# (the ceiling of the round time). Each prints human-readable lines and `RESULT ...` lines.
# Run on an otherwise idle machine: other processes on the same cores distort the figures.
#   bash benchmarks/speed.sh            # everything
#   bash benchmarks/speed.sh envs       # environments only
#   bash benchmarks/speed.sh algos      # algorithms and matmul rates (extra arguments go to benchmarks/bench_algos.py)
#   bash benchmarks/speed.sh matmul     # matmul rates only
# Works from any directory: it runs from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
shift || true
if [[ "$what" == all || "$what" == envs ]]; then
  python benchmarks/bench_mpe.py
  python benchmarks/bench_mamujoco.py
fi
if [[ "$what" == all || "$what" == algos ]]; then
  python benchmarks/bench_algos.py --bf16 "$@"
fi
if [[ "$what" == all || "$what" == algos || "$what" == matmul ]]; then
  python benchmarks/bench_matmul.py
fi
