#!/usr/bin/env bash
# Regenerates the paper's tables from scratch (or resumes: finished runs are skipped).
#   bash run_all.sh                       # Table 1, 3 seeds, full paper protocol, 2 runs at a time
#   bash run_all.sh table1 table2 table3  # the paper's tables (fig3 on request: it is long)
#   bash run_all.sh --quick               # every row, 3 rounds, one seed: a few minutes
#   bash run_all.sh --jobs 1 --seeds 0    # options: see python benchmark.py --help
# Rows go to results/<experiment>.csv, tables to results/<experiment>.md and the README.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
: "${FEDSC_DATA_DIR:=./data}"
export FEDSC_DATA_DIR
exec python benchmark.py "$@"
