#!/usr/bin/env bash
# Regenerates the tables from scratch, or resumes: a run whose arguments, data and code are
# unchanged since its row was written is not run again.
#   bash run_all.sh                       # Table 1, 3 seeds, full protocol, 2 runs at a time
#   bash run_all.sh table1 table2 table3  # the paper's tables (fig3 on request: it is long)
#   bash run_all.sh tune table1           # the tuning grid on 10X PBMC (writes recipes.json), then
#                                         # Table 1 with the paper's and the tuned recipe
#   bash run_all.sh mu                    # FedSC's download rules, mu over the rounds
#   bash run_all.sh split                 # each tuned recipe non-IID (Table 1's runs), IID, one client
#   bash run_all.sh --quick               # every Table 1 row, 3 rounds, one seed (printed only)
#   bash run_all.sh --jobs 1 --seeds 0    # options: see python benchmark.py --help
# Rows go to results/<experiment>.csv, logs to results/logs/, tables to results/<experiment>.md
# and the README (complete tables only; Table 1 also with its paper-recipe rows pending). Ctrl-C
# stops every run and says what finished.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
: "${FEDSC_DATA_DIR:=./data}"
export FEDSC_DATA_DIR
exec python benchmark.py "$@"
