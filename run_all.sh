#!/usr/bin/env bash
# Regenerates the tables from scratch, or resumes: a run whose arguments, data and code are
# unchanged since its row was written is not run again.
#   bash run_all.sh                       # the class table: every tuned recipe and the centralized
#                                         # references, 3 datasets x 3 seeds, 2 runs at a time
#   bash run_all.sh paper                 # the paper's protocol: Table 1's paper-recipe rows, Tables 2
#                                         # (also at FedBYOL's tuned recipe) and 3, Figure 3
#                                         # (`bash run_all.sh paper --plan --from-scratch`: its
#                                         # cost in a new results folder)
#   bash run_all.sh tune table1           # the tuning grid on 10X PBMC (writes recipes.json), then Table 1
#   bash run_all.sh mu split federated    # FedSC's download rules; what the split costs; pooled vs federated
#   bash run_all.sh anchor fast           # the PCA anchor for every method; the fast option --one-pass
#   bash run_all.sh --quick               # every class-table row, 3 rounds, one seed (printed only)
#   bash run_all.sh --plan                # what would run and its estimated cost; runs nothing
#   bash run_all.sh --jobs 1 --seeds 0    # options: see python benchmark.py --help
# Rows go to results/<experiment>.csv, logs to results/logs/, tables to results/<experiment>.md,
# docs/results.md and the README's class table (complete tables only). Ctrl-C stops every run and
# says what finished.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
: "${FEDSC_DATA_DIR:=./data}"
export FEDSC_DATA_DIR
exec python benchmark.py "$@"
