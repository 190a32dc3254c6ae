#!/usr/bin/env bash
# The paper's experiment grids (CleanRL convention): a thin wrapper around scripts/benchmark.py.
#   bash benchmark.sh smoke --jobs 1              # tiny runs, for tests
#   bash benchmark.sh table2-mpe --dry-run        # what is missing and its estimated CPU time
#   bash benchmark.sh table1 --jobs 2             # run locally, 2 runs at a time
#   bash benchmark.sh table2-halfcheetah --slurm --extra="--compile"  # a Slurm job array
# Speed benchmarks (ms per round, env throughput) moved to benchmarks/speed.sh.
set -euo pipefail
# paths (--data-dir, --results-dir, ...) are relative to the current directory
exec python "$(dirname "$0")/scripts/benchmark.py" "$@"
