"""Runs the experiments and builds the tables, figures and docs/README results from their CSVs.

    python benchmark.py [EXPERIMENT ...] [--seeds 0 1 2] [--jobs N] [--quick] [--tables-only]

Experiments: tune (the tuning grid on 10X PBMC; writes recipes.json), mu (FedSC's download rules),
federated (pooled vs federated preprocessing and evaluation),
table1 (every method, paper and tuned recipes, three datasets), split (each tuned recipe with the
cells IID over 4 clients or on one client; its non-IID runs are Table 1's), table2, table3, fig3. Each run is
one subprocess of a method file (one torch thread); its row lands in results/<experiment>.csv only
when it finishes. A row is reused (the run skipped) only when every argument, the data file's
sha256 and the hash of the code that produced it (the script and the modules it imports) match,
so an edited method file re-runs its own rows and an interrupted benchmark resumes where it
stopped. Tables are built only from these experiment CSVs (never from ad-hoc runs), and go to
results/<experiment>.md and the README only when every row has its full seed set; the one exception,
Table 1's paper-recipe rows (PENDING), read "pending" beside complete tuned and centralized rows.
run_all.sh is the front door.
"""
import argparse
import importlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

import cli
import common
import formats
import runs
import data as D

ROOT = os.path.dirname(os.path.abspath(__file__))
DATASETS = ["10X_PBMC", "mouse_bladder"]
SHORT = {"10X_PBMC": "PBMC", "mouse_bladder": "bladder", "baron_mouse_pancreas": "Baron"}

# The paper's numbers (ARI, NMI, silhouette in %), quoted beside ours.
PAPER_T1 = {
    "FedSimCLR": ((51.51, 66.30, 31.25), (25.07, 50.85, 26.31)),
    "FedMoCoV1": ((51.58, 62.62, 52.22), (27.62, 51.68, 26.53)),
    "FedMoCoV2": ((55.11, 64.99, 52.92), (28.83, 53.70, 26.46)),
    "FedSimSiam": ((49.95, 60.76, 31.99), (24.66, 48.27, 24.89)),
    "FedBYOL": ((59.70, 69.27, 53.12), (29.24, 56.21, 27.56)),
    "FedSC": ((62.57, 68.35, 54.70), (34.35, 57.84, 29.58)),
    "PCA-raw (paper)": ((19.00, 31.21, 40.24), (17.28, 43.94, 21.46)),
    "contrastive-sc": ((76.03, 76.42, 54.96), (44.51, 69.03, 37.72)),
}
PAPER_T2 = {  # (predictor, EMA, stop-gradient) -> FedBYOL on PBMC
    (1, 0, 0): (38.16, 49.87, 37.25), (1, 1, 0): (43.57, 51.08, 42.13), (1, 0, 1): (46.21, 55.36, 45.16),
    (0, 1, 1): (57.63, 67.12, 51.35), (1, 1, 1): (59.70, 69.27, 53.12)}
PAPER_T3 = {1: (19.57, 32.73, 14.09), 2: (30.43, 54.01, 26.18), 4: (34.35, 57.84, 29.58),
            8: (39.83, 62.45, 36.05)}

# ---------------------------------------------------------------------------------------------
# What to run: (row label, script, arguments, seed)
# ---------------------------------------------------------------------------------------------
FED = [("FedSimCLR", "fedsimclr.py", []), ("FedMoCoV1", "fedmoco.py", ["--version", "1"]),
       ("FedMoCoV2", "fedmoco.py", ["--version", "2"]), ("FedSimSiam", "fedsimsiam.py", []),
       ("FedBYOL", "fedbyol.py", []), ("FedSC", "fedsc.py", [])]
CENTRAL = [("PCA-50 + KMeans (centralized)", "centralized.py", ["--baseline", "pca"]),
           ("PCA-raw (paper)", "centralized.py", ["--baseline", "pca_raw"]),
           ("contrastive-sc", "centralized.py", ["--baseline", "csc"]),
           ("SimCLR, one client (centralized)", "fedsimclr.py", ["--clients", "1", "--partition", "iid", "--recipe", "paper"])]


def recipes():
    """The recipes Table 1 shows: the tuned one once `tune` has written recipes.json."""
    return ("paper", "tuned") if os.path.exists(cli.RECIPES) else ("paper",)


def pipeline_argv(ds, prep, extra):
    """A run of the pooled-vs-federated comparison: the tuned recipe once it exists, evaluated both ways."""
    return ["--data", ds, "--recipe", recipes()[-1], "--preprocess", prep, "--evaluate", "both"] + extra


# The tuning grid: the same for every method, on 10X PBMC only; the best mean ARI over three seeds
# wins (with one seed, the spread between seeds, up to 6 ARI, decided the choice). The grid spans the
# learning rates above the paper's 0.032 (too small once 4 clients average their updates) and shorter
# schedules (ARI peaks early in the paper's 300 rounds), at a sixth of a paper run's cost or less.
# (100 rounds x 1 epoch, in the one-seed grid, was the best for no method: results/archive/seed0-grid.)
TUNE_DATA = "10X_PBMC"
TUNE_LRS = (0.1, 0.3, 1.0)
TUNE_SCHEDULES = ((25, 5), (50, 5))  # (rounds, local epochs): at most 250 local epochs per client
TUNE_SEEDS = (0, 1, 2)
# The grid's third axis, BatchNorm statistics at evaluation (running / recompute), costs no training:
# each grid run trains once with --bn-stats recompute and its row also holds the scores of the same
# encoder with FedAvg's running statistics (bn_running_*).
TUNE_BN = ("running", "recompute")
# The grid's fourth axis: each method's one loss or architecture setting that the paper fixes, two
# values each (the paper's first, so those runs need no extra flag), the same budget for every method:
# the predictor of the three methods that have one (SPEC A15: one linear layer; or BYOL's own
# Linear-BN-ReLU-Linear), the softmax temperature of the three contrastive ones (SPEC: 0.07, MoCo v2
# 0.2; or 0.5, SimCLR's CIFAR value).
TUNE_AXIS = {"FedSimCLR": ("temperature", (0.07, 0.5)), "FedMoCoV1": ("temperature", (0.07, 0.5)),
             "FedMoCoV2": ("temperature", (0.2, 0.5)), "FedSimSiam": ("predictor", ("linear", "mlp")),
             "FedBYOL": ("predictor", ("linear", "mlp")), "FedSC": ("predictor", ("linear", "mlp"))}
# Fixed by design in the tuned recipe, not tuned: FedSC takes the download rule whose mu does not
# saturate with the lr's size (see the mu experiment).
TUNE_FIXED = {"FedSC": {"mu_rule": "relative"}}
MU_RULES = ("scaled", "literal", "relative", "bounded")
MU_SCHEDULE = ["--rounds", "50", "--local-epochs", "5", "--bn-stats", "recompute"]  # the tuned recipes' length
T1_DATASETS = DATASETS + ["baron_mouse_pancreas"]  # Baron: an out-of-sample check, no paper numbers
FED_PIPELINE = [("FedSimCLR", "fedsimclr.py", []), ("FedSC", "fedsc.py", [])]
MU_LRS = (0.032, 0.3)
T2_ROWS = [((1, 0, 0), ["--no-ema", "--no-sg"]), ((1, 1, 0), ["--no-sg"]), ((1, 0, 1), ["--no-ema"]),
           ((0, 1, 1), ["--no-predictor"]), ((1, 1, 1), [])]
T2_RECIPES = {"paper": [], "tuned": ["--recipe", "tuned"]}  # the tuned column: the same ablations at a short recipe
# The split experiment: what the non-IID split costs each method at its tuned recipe. The same runs
# as Table 1's tuned rows (its three datasets) with only the split changed: IID over the same 4
# clients, and one client holding every cell (centralized training with the same recipe). Its
# non-IID column is Table 1's own runs (SHARED_ROWS), not new ones.
SPLITS = [("non-IID (Table 1)", []), ("IID, 4 clients", ["--partition", "iid"]),
          ("one client", ["--clients", "1", "--partition", "iid"])]
# The cross-client study (issue: federated SSL against the exact federated PCA under label skew):
# each tuned recipe with a mechanism that gives every site the same axes; its rows without are the
# class table's. The weight is the largest at which every tuned recipe's first round is stable
# (lr x weight <= 1 with lr up to 1), a rule chosen before any ARI was seen on bladder or Baron.
MECHANISMS = [("PCA anchor", ["--anchor", "1"])]
# Faster numerics (issue: a round at the matrix-multiply bound), each a flag off by default, against
# the default at the paper's protocol on PBMC: FedSC (whose round speed.py times) and FedBYOL (Figure
# 3's method). The default rows are Table 1's. bf16 autocast and torch.compile are only timed (speed.py).
FAST = [("default", []), ("--one-pass", ["--one-pass"])]
EXPERIMENTS = ("tune", "mu", "federated", "class", "table1", "split", "anchor", "fast", "table2", "table3", "fig3")
# `bash run_all.sh` with no experiment: the class table. `paper`: the paper's full protocol.
GROUPS = {"paper": ["table1", "table2", "table3", "fig3"]}
# The class table: every method's tuned recipe and the centralized references (not the 300-round
# one-client SimCLR) on the three datasets; its runs are Table 1's, so either CSV serves both.
FED_EXACT = [("FedPCA-50 (exact, federated)", "fedpca.py", [])]  # no SGD: PCA from the sites' moments
CLASS_REFS = FED_EXACT + [c for c in CENTRAL if c[1] == "centralized.py"]
# ... and the study's mechanism on FedSC and its baseline FedBYOL (the anchor experiment's runs)
CLASS_MECH = [(f"{label} + {name}", script, extra + mech) for label, script, extra in FED
              if label in ("FedBYOL", "FedSC") for name, mech in MECHANISMS]
# An experiment whose runs may already have a row in another experiment's CSV: such a run is reused,
# not run again, and its table reads both CSVs.
SHARED_ROWS = {"split": ["table1", "class"], "class": ["table1", "anchor"], "table1": ["class"], "anchor": ["class", "table1"], "fast": ["table1"],
               "table2": ["table1", "class"]}
# Runs an experiment's table may show as pending: Table 1's paper-recipe rows, the one-client SimCLR
# row included (300 rounds each, about 12 CPU-hours in all), are published as "pending" until their
# seeds are all in, once every tuned and centralized row is complete. Any other missing run keeps a
# table unpublished.
PENDING = {"table1": "--recipe paper",
           # Figure 3's 100-local-epoch run: ~4.4 CPU-hours, 20 paper runs' worth; `python fedbyol.py --data
           # 10X_PBMC --local-epochs 100 --threads 2 --out results/fig3.csv` gives the same row in about half
           "fig3": "--local-epochs 100"}


def flags(options):
    """{"mu_rule": "relative"} -> ["--mu-rule", "relative"]"""
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def tune_argv(label, extra, lr, r, e, a=None):
    """A grid run; a is the value of the method's TUNE_AXIS setting (None or the first: the paper's)."""
    name, values = TUNE_AXIS[label]
    return (["--data", TUNE_DATA] + extra + flags(TUNE_FIXED.get(label, {}))
            + ["--lr", str(lr), "--rounds", str(r), "--local-epochs", str(e), "--bn-stats", "recompute"]
            + (flags({name: a}) if a is not None and a != values[0] else []))


TUNE_CONFIGS = [(lr, r, e) for lr in TUNE_LRS for r, e in TUNE_SCHEDULES]  # a tuning table's columns


def tune_points(label):
    """The method's grid points (lr, rounds, local epochs, axis value), in the tuning table's order."""
    return [(lr, r, e, a) for a in TUNE_AXIS[label][1] for lr, r, e in TUNE_CONFIGS]


def tune_choice(df, label, script, extra, overrides, missing):
    """A method's grid rows {axis value: [rows per TUNE_CONFIGS]}, their scores {(axis value, BN
    statistics): [mean ARI per config]}, and the best: (its key, its config's index); the first of
    equals in the tuning table's order. The tuning table and recipes.json both read it."""
    values = TUNE_AXIS[label][1]
    rows = {a: [rows_for(df, script, tune_argv(label, extra, lr, r, e, a), TUNE_SEEDS, overrides, missing)
                for lr, r, e in TUNE_CONFIGS] for a in values}
    scores = {(a, bn): [tune_score(rr, bn) for rr in rows[a]] for a in values for bn in TUNE_BN}
    best_key = max(scores, key=lambda k: max(scores[k]))
    return rows, scores, best_key, int(np.argmax(scores[best_key]))


def tune_score(rr, bn):
    """Mean ARI of a grid point's rows with BatchNorm statistics bn; -inf when there is none or when
    a seed diverged (a recipe that diverges on some seed is not chosen on the others' mean)."""
    col = "ari" if bn == "recompute" else "bn_running_ari"
    if "status" in rr and (rr["status"] == "diverged").any():
        return -np.inf
    return rr[col].mean() if len(rr) and col in rr and rr[col].notna().any() else -np.inf


def plan(experiment, seeds):
    runs = []
    if experiment == "tune":
        for label, script, extra in FED:
            for lr, r, e, a in tune_points(label):
                runs += [((label, lr, r, e, a), script, tune_argv(label, extra, lr, r, e, a), s) for s in TUNE_SEEDS]
    elif experiment == "mu":  # every seed at the larger lr, where the rules differ most; one at the paper's
        for lr in MU_LRS:
            some = seeds if lr == max(MU_LRS) else seeds[:1]
            for rule in MU_RULES:
                runs += [((rule, lr), "fedsc.py", ["--data", TUNE_DATA, "--lr", str(lr), "--mu-rule", rule] + MU_SCHEDULE, s)
                         for s in some]
            runs += [(("FedBYOL (mu = 0)", lr), "fedbyol.py", ["--data", TUNE_DATA, "--lr", str(lr)] + MU_SCHEDULE, s)
                     for s in some]
    elif experiment == "federated":  # pooled vs federated preprocessing; both evaluations in each run
        for ds in DATASETS:
            for label, script, extra in FED_PIPELINE:
                for prep in ("pooled", "federated"):
                    runs += [((label, ds, prep), script, pipeline_argv(ds, prep, extra), s) for s in seeds]
    elif experiment == "table1":  # what publishing needs first (tuned, then centralized); the 300-round runs last
        for recipe_ in sorted(recipes(), key=lambda r: r != "tuned"):
            for ds in T1_DATASETS:
                for label, script, extra in FED:
                    runs += [((label, recipe_, ds), script, ["--data", ds, "--recipe", recipe_] + extra, s) for s in seeds]
        for ds in T1_DATASETS:
            for label, script, extra in FED_EXACT + CENTRAL:
                runs += [((label, "", ds), script, ["--data", ds] + extra, s) for s in seeds]
        runs.sort(key=lambda run: PENDING["table1"] in " ".join(run[2]))  # stable: the pending runs last
    elif experiment == "class":
        for ds in T1_DATASETS:
            runs += [((label, "tuned", ds), script, ["--data", ds, "--recipe", "tuned"] + extra, s)
                     for label, script, extra in FED + CLASS_MECH for s in seeds]
            runs += [((label, "", ds), script, ["--data", ds] + extra, s) for label, script, extra in CLASS_REFS for s in seeds]
    elif experiment == "split":
        for ds in T1_DATASETS:
            for label, script, extra in FED:
                for name, split in SPLITS:
                    runs += [((label, ds, name), script, ["--data", ds, "--recipe", "tuned"] + with_split(extra, split), s)
                             for s in seeds]
    elif experiment == "anchor":  # the mechanisms first; the runs without are the class table's
        for name, mech in MECHANISMS + [("none", [])]:
            for ds in T1_DATASETS:
                runs += [((label, ds, name), script, ["--data", ds, "--recipe", "tuned"] + extra + mech, s)
                         for label, script, extra in FED for s in seeds]
        runs += [((label, ds, "none"), script, ["--data", ds] + extra, s)
                 for ds in T1_DATASETS for label, script, extra in FED_EXACT for s in seeds]
    elif experiment == "fast":  # the fast options first; the default runs are Table 1's
        for name, opt in FAST[::-1]:
            runs += [((label, name), script, ["--data", "10X_PBMC", "--recipe", "paper"] + extra + opt, s)
                     for label, script, extra in FED if label in ("FedSC", "FedBYOL") for s in seeds]
    elif experiment == "table2":  # the paper's recipe, then FedBYOL's tuned recipe (whose full model is Table 1's run)
        for recipe_ in T2_RECIPES:
            runs += [((flags, recipe_), "fedbyol.py", ["--data", "10X_PBMC"] + extra + T2_RECIPES[recipe_], s)
                     for flags, extra in T2_ROWS for s in seeds]
    elif experiment == "table3":
        for c in (1, 2, 4, 8):
            runs += [(c, "fedsc.py", ["--data", "mouse_bladder", "--types-per-client", str(c)], s) for s in seeds]
    elif experiment == "fig3":  # one seed, as the paper plots it (the sweep is ~43 paper-protocol runs per seed)
        seeds = seeds[:1]
        for r in (100, 200, 300, 400, 500):
            runs += [(("rounds", r), "fedbyol.py", ["--data", "10X_PBMC", "--rounds", str(r)], s) for s in seeds]
        for e in (5, 10, 25, 50, 100):
            runs += [(("local_epochs", e), "fedbyol.py", ["--data", "10X_PBMC", "--local-epochs", str(e)], s)
                     for s in seeds]
    else:
        raise SystemExit(f"unknown experiment '{experiment}': use {', '.join(EXPERIMENTS)}")
    return runs


def with_split(extra, split):
    """A run's options with a split's; --types-per-client (the class partition's) goes when the split
    sets another partition, which refuses it."""
    if "--partition" in split and "--types-per-client" in extra:
        i = extra.index("--types-per-client")
        extra = extra[:i] + extra[i + 2:]
    return extra + split


def applicable(script, overrides, argv):
    """The (flag, value) pairs of overrides that this script has and uses beside argv (e.g. --epochs: --baseline csc)."""
    cls = importlib.import_module(script[:-3]).Args
    unused = {f for flags, _ in cli.ignored(common.parse_args(cls, argv), cls.__dataclass_fields__) for f in flags}
    fields = {f"--{n.replace('_', '-')}" for n in cls.__dataclass_fields__} - unused
    pairs = zip(overrides[::2], overrides[1::2])
    return [x for flag, value in pairs if flag in fields for x in (flag, value)]


def resolved(script, argv):
    """The method file's own argument parsing and resolution, so the match is on what the run
    would record: every argument, the data file's sha256 and the code hash."""
    mod = importlib.import_module(script[:-3])
    return cli.resolve(common.parse_args(mod.Args, argv), os.path.join(ROOT, script))


def matching(df, args):
    """Rows of df from a run with exactly these arguments, data and code (where its output went
    and its thread count do not matter)."""
    keep = pd.Series(True, index=df.index)
    for k, v in vars(args).items():
        if k in ("out", "threads"):
            continue
        if k not in df:
            return df.iloc[:0]
        col = df[k]
        if isinstance(v, bool):
            keep &= col.astype(str) == str(v)
        elif isinstance(v, (int, float)):
            keep &= np.isclose(pd.to_numeric(col, errors="coerce"), v, rtol=1e-9, atol=0)
        else:
            keep &= col.fillna("").astype(str) == str(v)
    return df[keep]


def all_rows(results, experiments=EXPERIMENTS):
    """Rows of the experiment CSVs that benchmark.py writes (never runs.csv or other ad-hoc files)."""
    frames = [pd.read_csv(os.path.join(results, f"{e}.csv"), float_precision="round_trip", dtype=runs.TEXT_COLUMNS)
              for e in experiments
              if os.path.exists(os.path.join(results, f"{e}.csv"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def experiment_rows(results, exp):
    """The rows an experiment runs against and builds its table from: its own CSV's and SHARED_ROWS'."""
    return all_rows(results, [exp] + SHARED_ROWS.get(exp, []))


def full_argv(exp, script, argv, seed, results, overrides):
    out = os.path.join(results, f"{exp}.csv")
    if os.path.abspath(out).startswith(ROOT + os.sep):  # the rows record where they went: no machine's paths
        out = os.path.relpath(out, ROOT)
    return (argv + ["--seed", str(seed), "--threads", "1", "--out", out]
            + applicable(script, overrides, argv))


def execute(experiments, seeds, jobs, results, overrides, match=()):
    """Run what has no row yet, jobs at a time (only the runs whose command contains every text in
    `match`, when given). Ctrl-C stops the runs under way and says what finished; their rows are not written (a
    row is the last thing a run writes)."""
    failed = 0
    for exp in experiments:  # each experiment's runs resolved when it starts (tune writes recipes.json first)
        todo, skipped = to_do(exp, seeds, results, overrides, match)
        print(f"{exp}: {len(todo)} runs to do, {skipped} already have a row; {jobs} at a time", flush=True)
        cost(exp, todo, all_rows(results))
        failed += run_all(exp, [t[:5] for t in todo], jobs, results)
        if exp == "tune" and not overrides:
            write_recipes(all_rows(results, ["tune"]), seeds)
    return failed


def to_do(exp, seeds, results, overrides, match=()):
    """The runs of exp that have no row yet, one per config, as (label, script, argv, seed, config id,
    resolved args); and how many already have one."""
    df, todo, seen, skipped = experiment_rows(results, exp), [], set(), 0  # the rows its table uses
    for label, script, argv, seed in plan(exp, seeds):
        if not all(m in " ".join([script] + argv) for m in match):
            continue
        full = full_argv(exp, script, argv, seed, results, overrides)
        args = resolved(script, full)
        cid = runs.config_id(args)
        if len(matching(df, args)):
            skipped += 1
        elif cid not in seen:
            seen.add(cid)
            todo.append((label, script, full, seed, cid, args))
    return todo, skipped


def run_cost(script, args, known, q=0.5):
    """Estimated seconds of one run (one torch thread) from the finished one-thread rows (not diverged) of the same
    method and data (and baseline): the q-quantile of their seconds per round x local epoch (the
    median; q = 0: the fastest, as on a quiet machine), times this run's rounds x local epochs; for a
    centralized baseline, the q-quantile of their seconds."""
    same = known[(known.get("method", "") == args.method) & (known.get("data", "") == args.data)]
    if "threads" in same:
        same = same[pd.to_numeric(same["threads"], errors="coerce") == 1]
    if "status" in same:  # a diverged run stops early
        same = same[same["status"].fillna("ok").astype(str) == "ok"]
    if "baseline" in vars(args):
        same = same[same.get("baseline", pd.Series("", index=same.index)).astype(str) == args.baseline]
    if not len(same):
        return np.nan
    if hasattr(args, "rounds") and "rounds" in same:
        work = pd.to_numeric(same["rounds"], errors="coerce") * pd.to_numeric(same["local_epochs"], errors="coerce")
        per = (same["seconds"] / work).dropna()
        return float(per.quantile(q) * args.rounds * args.local_epochs) if len(per) else np.nan
    return float(same["seconds"].quantile(q))


def cost(exp, todo, known):
    """Print and return the estimated CPU seconds of an experiment's runs still to do: from the rows'
    median timings, and from their fastest (a quiet machine)."""
    out = []
    for q in (0.5, 0.0):
        secs = [run_cost(t[1], t[5], known, q) if len(known) else np.nan for t in todo]
        unknown = int(np.isnan(secs).sum())
        out.append(float(np.nansum(secs)) + 60 * unknown)  # a run of unknown cost: a minute
    print(f"plan: {exp}: {len(todo)} runs to do, ~{out[0] / 3600:.1f} CPU-hours (~{out[1] / 3600:.1f} at the fastest timings)"
          + (f" ({unknown} without a timing, counted as a minute)" if unknown else ""), flush=True)
    return np.array(out)


def estimate(experiments, seeds, jobs, results, overrides, match=(), scratch=False):
    """--plan: per experiment, the runs still to do (with scratch: every run, as in a new results
    folder) and their estimated cost from the rows' timings; a run whose row an experiment reads from
    another's (SHARED_ROWS) counts once."""
    known, planned, total = all_rows(results), {}, np.zeros(2)
    with tempfile.TemporaryDirectory() as empty:
        for exp in experiments:
            shared = {c for e in SHARED_ROWS.get(exp, []) for c in planned.get(e, ())}
            todo = [t for t in to_do(exp, seeds, empty if scratch else results, overrides, match)[0] if t[4] not in shared]
            planned[exp] = {t[4] for t in todo}
            total += cost(exp, todo, known)
    print(f"plan: in all ~{total[0] / 3600:.1f} CPU-hours, ~{total[0] / 3600 / jobs:.1f} h of wall time with {jobs} jobs "
          f"from the finished rows' median timings; ~{total[1] / 3600 / jobs:.1f} h from their fastest", flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_all(exp, todo, jobs, results):
    # Ctrl-C, kill -INT and kill -TERM all stop the runs under way (even where a shell started this
    # process with SIGINT ignored, as background jobs are)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    logs = os.path.join(results, "logs", exp)
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    t0, running, done, failed, queue = time.time(), [], [], 0, list(todo)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                label, script, argv, seed, cid = queue.pop(0)
                name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{script[:-3]}__s{seed}__{cid}__{time.strftime('%Y%m%d-%H%M%S')}")
                log = os.path.join(logs, f"{name}.log")  # a resumed run never overwrites a log
                f = open(log, "x")
                proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script)] + argv, stdout=f,
                                        stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                running.append((proc, f, label, script, argv, log, time.time()))
            time.sleep(0.2)
            for item in [r for r in running if r[0].poll() is not None]:
                running.remove(item)
                proc, f, label, script, argv, log, t_run = item
                f.close()
                done.append(label)
                ok = proc.returncode in (0, 3)  # 3: training diverged, the row says so
                failed += not ok
                tail = open(log).read().strip().splitlines()[-3:]
                ari = next((m.group(1) for l in tail for m in [re.search(r"final .*?  ari ([-\d.]+)", l)] if m), "-")
                status = (f"ARI {ari}" if proc.returncode == 0 else "diverged" if ok
                          else f"FAILED (exit {proc.returncode}, see {log})")
                left = (time.time() - t0) / len(done) * (len(todo) - len(done)) / 60
                what = " ".join(argv[:argv.index("--threads")])
                print(f"[{len(done)}/{len(todo)}] {exp} {script} {what}: {time.time() - t_run:.0f}s {status}  "
                      f"(~{left:.0f} min left)", flush=True)
    except KeyboardInterrupt:
        for proc, f, *_ in running:
            proc.terminate()
        for proc, f, *_ in running:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            f.close()
        print(f"\ninterrupted: {len(done)} of {len(todo)} {exp} runs finished and have their rows; "
              f"{len(running)} stopped, {len(queue)} not started. Run the same command again to resume.",
              flush=True)
        sys.exit(130)
    print(f"{exp}: {len(done)} runs in {(time.time() - t0) / 60:.1f} min, {failed} failed", flush=True)
    return failed


# ---------------------------------------------------------------------------------------------
# Tables: mean ± std over seeds, built only from the experiment CSVs
# ---------------------------------------------------------------------------------------------
class Missing(list):
    """What a table lacks: (row description, seeds without a row)."""


def rows_for(df, script, argv, seeds, overrides, missing):
    out, extra = [], applicable(script, list(overrides), argv)
    for s in seeds:
        r = matching(df, resolved(script, argv + ["--seed", str(s)] + extra))
        if len(r):
            out.append(r.iloc[[-1]])
        else:
            missing.append((f"{script} {' '.join(argv)}", s))
    return pd.concat(out) if out else pd.DataFrame()


def cell(r, metric):
    if len(r) == 0 or metric not in r:
        return "–"
    diverged = int((r["status"] == "diverged").sum()) if "status" in r else 0
    if diverged == len(r):
        return "diverged"
    v = r[metric].to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    s = f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
    s += f" ({diverged} of {len(r)} diverged)" if diverged else ""
    return s + (" (collapsed)" if "collapsed" in r and r["collapsed"].astype(str).eq("True").any() else "")


def fmt(nums):
    return " / ".join(f"{x:.2f}" for x in nums)


def secs(r):
    return f"{r['seconds'].mean():.0f}" if len(r) else "–"


def recipe_text(script, argv):
    """How a tuned row differs from the paper's recipe, e.g. "lr 1, 50 x 5, BN recomputed, predictor mlp"."""
    a = resolved(script, argv + ["--seed", "0"])
    p = resolved(script, [x if x != "tuned" else "paper" for x in argv] + ["--seed", "0"])
    changed = "".join(f", {k} {getattr(a, k)}" for k in ("predictor", "temperature")
                      if hasattr(a, k) and getattr(a, k) != getattr(p, k))
    return (f"lr {a.lr:g}, {a.rounds} x {a.local_epochs}" + (", BN recomputed" if getattr(a, "bn_stats", "") == "recompute" else "")
            + changed + (f", --anchor {a.anchor:g}" if getattr(a, "anchor", 0) else ""))


def table1(df, seeds, overrides, missing):
    head = "| method | recipe |"
    for i, ds in enumerate(T1_DATASETS):
        head += f" {SHORT[ds]} ARI | NMI | Sil |" + (" paper ARI / NMI / Sil |" if i < 2 else "")
    out = [head + " s/run |", "|" + "---|" * head.count("|")]
    rows = [(l, s, e, rc) for l, s, e in FED for rc in recipes()] + [(l, s, e, None) for l, s, e in FED_EXACT + CENTRAL]
    for label, script, extra, recipe in rows:
        extra = extra + (["--recipe", recipe] if recipe else [])
        pending_row = PENDING["table1"] in " ".join(extra)
        shown = recipe or ("paper" if pending_row else None)  # one-client SimCLR
        line = f"| {label} | {f'{shown}: ' + recipe_text(script, ['--data', DATASETS[0]] + extra) if shown else '–'} |"
        t = []
        for i, ds in enumerate(T1_DATASETS):
            r = rows_for(df, script, ["--data", ds] + extra, seeds, overrides, missing)
            if pending_row and len(r) < len(seeds):  # no mean of a partial seed set
                line += f" pending ({len(r)} of {len(seeds)} seeds) | – | – |"
                r = r.iloc[:0]
            else:
                line += "".join(f" {cell(r, m)} |" for m in ("ari", "nmi", "sil"))
            if i < 2:
                paper = PAPER_T1.get(label) if recipe != "tuned" else None
                line += f" {fmt(paper[i]) if paper else '–'} |"
            t.append(secs(r))
        out.append(line + f" {' / '.join(t)} |")
    return "\n".join(out)


def tune_table(df, seeds, overrides, missing):
    out = ["| method | setting | BatchNorm statistics |" + "".join(f" lr {lr:g}, {r} x {e} |" for lr, r, e in TUNE_CONFIGS)
           + " chosen |", "|" + "---|" * (len(TUNE_CONFIGS) + 4)]
    for label, script, extra in FED:
        name, values = TUNE_AXIS[label]
        rows, scores, best_key, best = tune_choice(df, label, script, extra, overrides, missing)
        lr, r, e = TUNE_CONFIGS[best]
        first = True
        for a in values:
            for bn in TUNE_BN:
                col = "ari" if bn == "recompute" else "bn_running_ari"
                sds = [rr[col].std(ddof=1) if len(rr) > 1 and col in rr else np.nan for rr in rows[a]]
                cells = [("–" if not np.isfinite(v) else f"{v:.2f}" + (f" ± {sd:.2f}" if np.isfinite(sd) else ""))
                         for v, sd in zip(scores[(a, bn)], sds)]
                cells = [f"diverged ({k} of {len(rr)})" if (k := int((rr.get("status", pd.Series(dtype=str)) == "diverged").sum()))
                         else c for c, rr in zip(cells, rows[a])]
                cells = [f"**{c}**" if (a, bn) == best_key and i == best else c for i, c in enumerate(cells)]
                chosen = f"lr {lr:g}, {r} x {e}, {name} {best_key[0]}, {best_key[1]}" if first else ""
                out.append(f"| {label if first else ''} | {name} {a} | {bn} |" + "".join(f" {c} |" for c in cells)
                           + f" {chosen} |")
                first = False
    return "\n".join(out)


def write_recipes(df, seeds):
    """recipes.json: for each method, the grid point (lr, rounds x epochs, BatchNorm statistics, its
    TUNE_AXIS setting) with the best mean ARI on 10X PBMC; the first of equals in the tuning table's order."""
    chosen, missing = {}, Missing()
    for label, script, extra in FED:
        _, _, (a, bn), best = tune_choice(df, label, script, extra, [], missing)
        lr, r, e = TUNE_CONFIGS[best]
        chosen[label] = dict(lr=lr, rounds=r, local_epochs=e, bn_stats=bn, **{TUNE_AXIS[label][0]: a},
                             **TUNE_FIXED.get(label, {}))
    if missing:
        print(f"tune is incomplete ({len(missing)} runs missing): recipes.json not written", flush=True)
        return
    doc = {"rule": f"for each method, the (lr, rounds, local epochs, BatchNorm statistics, its predictor or temperature) "
                   f"of the grid with the best mean ARI on {TUNE_DATA} over seeds {list(TUNE_SEEDS)}; fixed by design, not tuned: {TUNE_FIXED}; "
                   f"every other setting is the paper's",
           "grid": {"lr": list(TUNE_LRS), "rounds x local_epochs": [list(x) for x in TUNE_SCHEDULES],
                    "bn_stats": list(TUNE_BN), "predictor or temperature": {k: list(v[1]) for k, v in TUNE_AXIS.items()}},
           "recipes": chosen}
    formats.write_atomic(cli.RECIPES, lambda tmp: json.dump(doc, open(tmp, "w"), indent=1))
    print(f"wrote {cli.RECIPES}: {chosen}", flush=True)


def mu_table(df, seeds, overrides, missing, results):
    """FedSC's download rules: scores, and mean mu over the clients at a few rounds, read from the
    rows' mu_by_round (means over seeds); share of rounds whose mean mu is 1, or below 0.05."""
    out = ["| download rule | lr | seeds | ARI | NMI | Sil | mean mu, round 2 | round R/10 | round R/2 | last round | "
           "rounds with mean mu = 1 | with mean mu < 0.05 |", "|" + "---|" * 12]
    groups = {}
    for label, script, argv, s in plan("mu", seeds):
        groups.setdefault(label, (script, argv, []))[2].append(s)
    for label, (script, argv, some) in groups.items():
        r = rows_for(df, script, argv, some, overrides, missing)
        traj = "| – | – | – | – | – | – |"
        if len(r) and "mu_by_round" in r and r["mu_by_round"].notna().all():
            mu = np.array([[float(v) for v in str(t).split()] for t in r["mu_by_round"]]).mean(0)
            R = len(mu)
            at = [mu[x - 1] for x in (2, max(2, R // 10), R // 2, R)]
            traj = ("| " + " | ".join(f"{v:.3f}" for v in at) + f" | {100 * np.mean(mu[1:] >= 0.999):.0f}% |"
                    f" {100 * np.mean(mu[1:] < 0.05):.0f}% |")
        out.append(f"| {label[0]} | {label[1]:g} | {len(some)} |" + "".join(f" {cell(r, m)} |" for m in ("ari", "nmi", "sil"))
                   + traj[1:])
    return "\n".join(out)


def federated_table(df, seeds, overrides, missing):
    """Pooled vs federated preprocessing; each run evaluated both ways (pooled KMeans on every
    cell, and federated KMeans from per-site sums on the clients' cells)."""
    out = ["| method | data | preprocessing | ARI, pooled evaluation | NMI | ARI, federated evaluation | NMI | "
           "simplified Sil | runs whose genes = pooled preprocessing's |", "|" + "---|" * 9]
    for ds in DATASETS:
        for label, script, extra in FED_PIPELINE:
            pooled_genes = set()
            for prep in ("pooled", "federated"):
                r = rows_for(df, script, pipeline_argv(ds, prep, extra), seeds, overrides, missing)
                genes = r["genes_sha"].astype(str).tolist() if len(r) and "genes_sha" in r else []
                pooled_genes |= set(genes) if prep == "pooled" else set()
                same = f"{sum(g in pooled_genes for g in genes)} of {len(genes)}" if genes else "–"
                out.append(f"| {label} | {SHORT[ds]} | {prep} |" + "".join(
                    f" {cell(r, m)} |" for m in ("ari", "nmi", "fed_ari", "fed_nmi", "fed_sil_simplified")) + f" {same} |")
    return "\n".join(out)


def split_table(df, seeds, overrides, missing):
    """ARI per method and split at the tuned recipe; the last columns split the drop from one client
    to the non-IID split in two: federating itself (one client - IID) and the non-IID split (IID - non-IID)."""
    out = ["| method | recipe |" + "".join(f" {SHORT[ds]}: {name} |" for ds in T1_DATASETS for name, _ in SPLITS)
           + "".join(f" {SHORT[ds]}: one client - IID | {SHORT[ds]}: IID - non-IID |" for ds in T1_DATASETS),
           "|" + "---|" * (2 + len(T1_DATASETS) * (len(SPLITS) + 2))]
    for label, script, extra in FED:
        line, gaps = f"| {label} | {recipe_text(script, ['--data', DATASETS[0], '--recipe', 'tuned'] + extra)} |", ""
        for ds in T1_DATASETS:
            rr = [rows_for(df, script, ["--data", ds, "--recipe", "tuned"] + with_split(extra, split), seeds, overrides, missing)
                  for _, split in SPLITS]
            line += "".join(f" {cell(r, 'ari')} |" for r in rr)
            non_iid, iid, one = [r["ari"].mean() if len(r) and "ari" in r else np.nan for r in rr]  # SPLITS' order
            gaps += f" {one - iid:+.2f} | {iid - non_iid:+.2f} |" if np.isfinite([non_iid, iid, one]).all() else " – | – |"
        out.append(line + gaps)
    return "\n".join(out)


def class_table(df, seeds, overrides, missing):
    """One row per method (tuned recipe) and reference: ARI, mean ± std over the seeds, per dataset."""
    out = ["| method | recipe |" + "".join(f" {SHORT[ds]} ARI |" for ds in T1_DATASETS) + " s/run |",
           "|" + "---|" * (3 + len(T1_DATASETS))]
    for label, script, extra in [(l, s, e + ["--recipe", "tuned"]) for l, s, e in FED + CLASS_MECH] + CLASS_REFS:
        rr = [rows_for(df, script, ["--data", ds] + extra, seeds, overrides, missing) for ds in T1_DATASETS]
        recipe = recipe_text(script, ["--data", DATASETS[0]] + extra) if "tuned" in extra else "–"
        out.append(f"| {label} | {recipe} |" + "".join(f" {cell(r, 'ari')} |" for r in rr)
                   + f" {' / '.join(secs(r) for r in rr)} |")
    return "\n".join(out)


def anchor_table(df, seeds, overrides, missing):
    """ARI of each tuned recipe without and with each mechanism, per dataset; FedPCA-50 below."""
    names = ["without"] + [name for name, _ in MECHANISMS]
    out = ["| method |" + "".join(f" {SHORT[ds]}: {n} |" for ds in T1_DATASETS for n in names),
           "|" + "---|" * (1 + len(T1_DATASETS) * len(names))]
    for label, script, extra in FED:
        line = f"| {label} |"
        for ds in T1_DATASETS:
            rr = [rows_for(df, script, ["--data", ds, "--recipe", "tuned"] + extra + mech, seeds, overrides, missing)
                  for mech in [[]] + [m for _, m in MECHANISMS]]
            line += "".join(f" {cell(r, 'ari')} |" for r in rr)
        out.append(line)
    for label, script, extra in FED_EXACT:
        rr = [rows_for(df, script, ["--data", ds] + extra, seeds, overrides, missing) for ds in T1_DATASETS]
        out.append(f"| {label} |" + "".join(f" {cell(r, 'ari')} |" + " – |" * len(MECHANISMS) for r in rr))
    return "\n".join(out)


def fast_table(df, seeds, overrides, missing):
    out = ["| method | numerics | ARI | NMI | Sil | s/run |", "|" + "---|" * 6]
    for (label, name), script, argv, _ in sorted(plan("fast", seeds[:1]), key=lambda run: run[0][0]):
        r = rows_for(df, script, argv, seeds, overrides, missing)
        out.append(f"| {label} | {name} |" + "".join(f" {cell(r, m)} |" for m in ("ari", "nmi", "sil")) + f" {secs(r)} |")
    return "\n".join(out)


def table2(df, seeds, overrides, missing):
    mark = {1: "✓", 0: "✗"}
    out = ["| predictor | EMA | stop-grad | ARI | NMI | Sil | paper ARI / NMI / Sil | s/run | tuned recipe: ARI | s/run |",
           "|" + "---|" * 10]
    for flags, extra in T2_ROWS:
        r, t = (rows_for(df, "fedbyol.py", ["--data", "10X_PBMC"] + extra + T2_RECIPES[k], seeds, overrides, missing)
                for k in ("paper", "tuned"))
        out.append(f"| {' | '.join(mark[f] for f in flags)} |" + "".join(f" {cell(r, m)} |" for m in ("ari", "nmi", "sil"))
                   + f" {fmt(PAPER_T2[flags])} | {secs(r)} | {cell(t, 'ari')} | {secs(t)} |")
    return "\n".join(out)


def table3(df, seeds, overrides, missing):
    out = ["| types per client | ARI | NMI | Sil | paper ARI / NMI / Sil | s/run |", "|" + "---|" * 6]
    for c in (1, 2, 4, 8):
        r = rows_for(df, "fedsc.py", ["--data", "mouse_bladder", "--types-per-client", str(c)], seeds, overrides, missing)
        out.append(f"| {c} |" + "".join(f" {cell(r, m)} |" for m in ("ari", "nmi", "sil"))
                   + f" {fmt(PAPER_T3[c])} | {secs(r)} |")
    return "\n".join(out)


def fig3_table(df, seeds, overrides, missing):
    out = ["| setting | ARI | NMI | Sil | s/run |", "|" + "---|" * 5]
    for label, script, argv, s in plan("fig3", seeds[:1]):
        r = rows_for(df, script, argv, seeds[:1], overrides, missing)
        pending = not len(r) and PENDING["fig3"] in " ".join(argv)
        out.append(f"| {label[0]} = {label[1]} |" + "".join(" pending |" if pending else f" {cell(r, m)} |"
                                                            for m in ("ari", "nmi", "sil")) + f" {secs(r)} |")
    return "\n".join(out)


TITLES = {"class": "ARI (%) of every method's tuned recipe on the paper's non-IID split (4 clients), "
                   "and centralized references; mean ± std over seeds 0, 1, 2",
          "tune": f"Tuning grid: ARI on 10X PBMC, mean ± std over seeds {', '.join(map(str, TUNE_SEEDS))}; "
                  "the best mean per method (bold) is its tuned recipe",
          "mu": "FedSC's download rule: ARI and mu over the rounds (10X PBMC, 50 rounds x 5 local epochs, BN statistics recomputed; mean ± std over the seeds; mu means over the clients and seeds)",
          "federated": "Nothing but aggregates leaves a site: pooled vs federated preprocessing and evaluation "
                       "(tuned recipe, mean ± std over seeds)",
          "table1": "Table 1: every method with the paper's and the tuned recipe, and centralized references "
                    "(mean ± std over seeds)",
          "split": "What the split costs: ARI at each method's tuned recipe with the cells split non-IID over 4 clients "
                   "(Table 1), IID over 4 clients, or all on one client (mean ± std over seeds)",
          "anchor": "Axes every site shares: ARI at each method's tuned recipe on the paper's non-IID split, without "
                    "and with the PCA anchor (--anchor 1: a head on f(x) regresses each cell's exact federated PCA-50 "
                    "coordinates); mean ± std over seeds 0, 1, 2",
          "fast": "Faster numerics at the paper's protocol on 10X PBMC: the default and each fast option (mean ± std "
                  "over seeds; s/run from runs at different times and loads: speed.py gives the in-run ratio)",
          "table2": "Table 2: FedBYOL ablation on 10X PBMC (paper recipe; the last two columns: the same "
                    "ablations at FedBYOL's tuned recipe)",
          "table3": "Table 3: FedSC on mouse bladder, cell types per client (paper recipe)",
          "fig3": "Figure 3 sweep: FedBYOL on 10X PBMC, rounds and local epochs (paper recipe, seed 0)"}


def build(exp, df, seeds, overrides, results):
    missing = Missing()
    if exp == "mu":
        md = mu_table(df, seeds, overrides, missing, results)
    else:
        md = {"class": class_table, "tune": tune_table, "federated": federated_table, "table1": table1, "split": split_table, "anchor": anchor_table, "fast": fast_table, "table2": table2, "table3": table3,
              "fig3": fig3_table}[exp](df, seeds, overrides, missing)
    return md, missing


def provenance(df):
    """Which data, code commits and machine the rows come from, and how long their runs took."""
    commits = ", ".join(f"`{c}`" for c in sorted(set(df["commit"].astype(str)))) if "commit" in df else "unknown"
    files = ", ".join(f"`{b['file']}` (sha256 {b['sha256'][:12]}…)" for b in D.BENCHMARKS.values())
    threads = (sorted(set(pd.to_numeric(df["threads"], errors="coerce").dropna().astype(int))) if "threads" in df else []) or [1]
    each = "one torch thread each" if threads == [1] else f"{' or '.join(map(str, threads))} torch threads per run"
    return (f"Data: {files}. Code: commit {commits}. Runs: {len(df)} in {df['seconds'].sum() / 3600:.1f} "
            f"{'CPU-hours' if threads == [1] else 'hours'} (sum of per-run wall times, {each}, {platform.machine()}, "
            f"torch {df['torch'].iloc[0] if 'torch' in df and len(df) else '?'}).")


def pending_runs(exp, missing):
    """The missing runs that a table may show as pending (PENDING): Table 1's paper-recipe runs, and
    only beside a tuned recipe (without recipes.json every federated row would be pending)."""
    if exp not in PENDING or (exp == "table1" and "tuned" not in recipes()):
        return []
    return [(w, s) for w, s in missing if PENDING[exp] in w]


def write_tables(experiments, seeds, results, overrides, publish, verbose=True):
    """Print every table; write results/<exp>.md only for complete tables (every row with its full
    seed set, or pending_runs) and return those. A table that is no longer complete (e.g. after a
    code change) loses its results/<exp>.md, so that no stale table is left there."""
    complete = {}
    for exp in experiments:
        df = experiment_rows(results, exp)
        md, missing = build(exp, df, seeds, overrides, results)
        if verbose:
            quick = f" [QUICK: {' '.join(overrides)}, seeds {' '.join(map(str, seeds))}; not the tables' protocol]" if overrides else ""
            print(f"\n{TITLES[exp]}{quick}\n\n{md}", flush=True)
        pending = pending_runs(exp, missing)
        found = [matching(df, resolved(script, full_argv(exp, script, argv, s, results, overrides)))
                 for _, script, argv, s in plan(exp, seeds)] if len(missing) == len(pending) else []
        if not any(len(r) for r in found):
            if verbose:
                print(f"\n{exp} is incomplete, {len(missing) - len(pending)} runs missing (not published), e.g. "
                      + "; ".join(f"{w} --seed {s}" for w, s in missing if (w, s) not in pending)[:600], flush=True)
            stale = os.path.join(results, f"{exp}.md")
            if publish and os.path.exists(stale):
                os.remove(stale)
                print(f"removed {stale}: its table no longer matches the code and data", flush=True)
            continue
        used = pd.concat([r.iloc[[-1]] for r in found if len(r)]).drop_duplicates("run")
        note = provenance(used)
        if pending:
            note += (f" Pending: {len(pending)} run{'s' if len(pending) > 1 else ''} with `{PENDING[exp]}` (their "
                     f"rows say how many seeds are in; `bash run_all.sh {exp}` resumes them).")
        complete[exp] = (md, note)
        if publish:
            with open(os.path.join(results, f"{exp}.md"), "w") as f:
                f.write(f"**{TITLES[exp]}**\n\n{md}\n\n{complete[exp][1]}\n")
    return complete


def readme_block(name, body, source):
    """Replace the block between <!-- name:start --> and <!-- name:end --> in README.md or the docs/
    page that holds it (atomically); links to results/ are made relative to that page."""
    docs = os.path.join(ROOT, "docs")
    pages = [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(docs, p) for p in (os.listdir(docs) if os.path.isdir(docs) else []) if p.endswith(".md"))
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    path = next((p for p in pages if start in open(p).read() and end in open(p).read()), None)
    if path is None:
        print(f"README.md and docs/ have no {name} markers; left them alone", flush=True)
        return
    text = open(path).read()
    if os.path.dirname(path) != ROOT:
        body = body.replace("](results/", "](../results/")
    block = f"{start}\n<!-- written by {source}; do not edit by hand -->\n\n{body}\n{end}"
    text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    formats.write_atomic(path, lambda tmp: open(tmp, "w").write(text))
    print(f"{os.path.relpath(path, ROOT)} {name} section updated", flush=True)


def publish(name, md, source, readme=None):
    """results/<name>.md gets md; the README's <name> block gets readme (default: md)."""
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    formats.write_atomic(os.path.join(ROOT, "results", f"{name}.md"), lambda tmp: open(tmp, "w").write(md + "\n"))
    readme_block(name, md if readme is None else readme, source)


def update_readme(tables):
    """docs/results.md's results block: every complete generated table, and the Table 1 figure; the
    README's class block: the class table."""
    if "class" in tables:
        md, note = tables["class"]
        readme_block("class", f"**{TITLES['class']}**\n\n{md}\n\n{note}", "benchmark.py from results/*.csv")
    body = "\n\n".join(f"**{TITLES[k]}**\n\n{md}\n\n{note}" for k, (md, note) in tables.items())
    figs = [f for f in ("table1.png", "fig3.png") if os.path.exists(os.path.join(ROOT, "results", "figures", f))]
    body += "".join(f"\n\n![{f[:-4]}](results/figures/{f})" for f in figs)
    readme_block("results", body, "benchmark.py from results/*.csv")


def pyplot():
    """matplotlib's pyplot (no display needed), or None with a note when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)", flush=True)
        return None
    return plt


def figure(results, seeds):
    """Table 1 as bars (ARI per method and recipe, per dataset), the paper's ARI marked."""
    plt = pyplot()
    if plt is None:
        return
    df = experiment_rows(results, "table1")
    fig, axes = plt.subplots(1, len(T1_DATASETS), figsize=(22, 4.2))
    for ax, ds in zip(axes, T1_DATASETS):
        labels, means, stds, paper = [], [], [], []
        for label, script, extra in [(l, s, e + ["--recipe", rc]) for l, s, e in FED for rc in recipes()] + FED_EXACT + CENTRAL:
            r = rows_for(df, script, ["--data", ds] + extra, seeds, [], Missing())
            if len(r) == len(seeds) and "ari" in r:  # a pending row (partial seed set) is not drawn
                tag = " (tuned)" if "tuned" in extra else ""
                labels.append(label.replace(" (centralized)", "*") + tag)
                means.append(r["ari"].mean())
                stds.append(r["ari"].std(ddof=1) if len(r) > 1 else 0)
                i = T1_DATASETS.index(ds)
                paper.append(PAPER_T1[label][i][0] if label in PAPER_T1 and i < 2 and not tag else np.nan)
        x = np.arange(len(labels))
        ax.bar(x, means, yerr=stds, color=["tab:orange" if "tuned" in l else "tab:blue" for l in labels])
        ax.scatter(x, paper, marker="_", s=250, color="k", zorder=3, label="paper ARI")
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{ds}: ARI")
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.join(results, "figures"), exist_ok=True)
    fig.savefig(os.path.join(results, "figures", "table1.png"), dpi=110)
    plt.close(fig)


def fig3_figure(results, seeds):
    """Figure 3 as the paper draws it: ARI, NMI and silhouette against the rounds (5 local epochs)
    and against the local epochs (300 rounds); a run still pending is left out of its line."""
    plt = pyplot()
    if plt is None:
        return
    df = experiment_rows(results, "fig3")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, what in zip(axes, ("rounds", "local_epochs")):
        points = [(label[1], rows_for(df, script, argv, seeds[:1], [], Missing()))
                  for label, script, argv, _ in plan("fig3", seeds[:1]) if label[0] == what]
        for m, name in (("ari", "ARI"), ("nmi", "NMI"), ("sil", "Silhouette")):
            xy = [(x, r[m].mean()) for x, r in points if len(r) and m in r]
            ax.plot(*zip(*xy), marker="o", label=name)
        if what == "local_epochs":  # 5 to 100: a log axis, ticks at the values run
            ax.set_xscale("log")
            ax.set_xticks([x for x, _ in points], [str(x) for x, _ in points])
        ax.set_xlabel("total rounds (5 local epochs)" if what == "rounds" else "local epochs (300 rounds)")
        ax.set_ylabel("%")
        ax.legend(fontsize=8)
    fig.suptitle("FedBYOL on 10X PBMC, paper recipe, seed 0", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.join(results, "figures"), exist_ok=True)
    fig.savefig(os.path.join(results, "figures", "fig3.png"), dpi=110)
    plt.close(fig)


def main():
    if sys.argv[1:2] == ["rehash"]:  # verified re-stamp of the rows after a refactor (rehash.py)
        import rehash
        sys.exit(rehash.main(sys.argv[2:]))
    if sys.argv[1:2] == ["map"]:  # the class's picture: FedBYOL's embedding without and with the anchor, and IID
        import figures
        sys.exit(figures.main(sys.argv[2:]))
    if sys.argv[1:2] == ["readme"]:  # the README's reading-order and first-run blocks
        import readme
        sys.exit(readme.main(sys.argv[2:]))
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="*", default=["class"],
                   help=" ".join(EXPERIMENTS) + "; paper = " + " ".join(GROUPS["paper"]) + " (default: class)")
    p.add_argument("--plan", action="store_true", help="print what would run and its estimated cost, run nothing")
    p.add_argument("--from-scratch", action="store_true",
                   help="with --plan: the cost of every run, as if no row existed (a new results folder)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each")
    p.add_argument("--quick", action="store_true",
                   help="every row with 3 rounds of 1 local epoch and one seed, into results/quick/ "
                        "(tables printed, nothing published)")
    p.add_argument("--results", default=os.path.join(ROOT, "results"))
    p.add_argument("--tables-only", action="store_true", help="only rebuild the tables (and the README)")
    p.add_argument("--match", action="append", default=[],
                   help="run only the runs whose command contains this text, e.g. '--recipe tuned' or 'fedsc.py'; "
                        "repeated, every text must occur (tables are built from all rows)")
    a = p.parse_args()
    if a.from_scratch and not a.plan:
        p.error("--from-scratch goes with --plan (a run from scratch: --results with a new folder)")
    if any(not 0 <= s < 2 ** 32 for s in a.seeds):
        p.error(f"--seeds must be in [0, 2^32), got {' '.join(map(str, a.seeds))}")
    if os.path.exists(a.results) and not os.path.isdir(a.results):
        p.error(f"--results '{a.results}' is a file; give the folder of the experiment CSVs")
    if a.jobs < 1:
        p.error(f"--jobs must be at least 1, got {a.jobs}")
    a.experiments = [x for e in a.experiments for x in GROUPS.get(e, [e])]
    for e in a.experiments:
        if e not in EXPERIMENTS:
            p.error(f"unknown experiment '{e}': use {', '.join(EXPERIMENTS)}")
    overrides, results = [], a.results
    if a.quick:
        overrides, results = ["--rounds", "3", "--local-epochs", "1", "--epochs", "3"], os.path.join(a.results, "quick")
        a.seeds = a.seeds if a.seeds != [0, 1, 2] else [0]
    experiments = [e for e in EXPERIMENTS if e in a.experiments]  # tune before the tables that use it
    with common.user_errors():
        if a.plan:
            estimate(experiments, a.seeds, a.jobs, results, overrides, a.match, a.from_scratch)
            return
        failed = 0 if a.tables_only else execute(experiments, a.seeds, a.jobs, results, overrides, a.match)
        publish = not a.quick and results == os.path.join(ROOT, "results") and a.seeds == [0, 1, 2]
        complete = write_tables(experiments, a.seeds, results, overrides, publish)
        if publish:
            if "table1" in complete:
                figure(results, a.seeds)
            if "fig3" in complete:
                fig3_figure(results, a.seeds)
            # the README shows every experiment whose table is complete, not only the ones just run
            others = [e for e in EXPERIMENTS if e not in experiments and os.path.exists(os.path.join(results, f"{e}.csv"))]
            complete.update(write_tables(others, a.seeds, results, overrides, publish, verbose=False))
            update_readme({e: complete[e] for e in EXPERIMENTS if e in complete})
        elif complete:
            print("\n(quick, partial or custom-seed tables are printed only: README and results/*.md unchanged)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
