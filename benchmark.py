"""Runs the paper's experiments and builds the tables, figures and README results from the CSVs.

    python benchmark.py [EXPERIMENT ...] [--seeds 0 1 2] [--jobs N] [--quick] [--tables-only]

Experiments: table1 (default), table2, table3, fig3, and improve (FedSC settings beyond the paper). Each run is one subprocess of a method file
(one torch thread); its row lands in results/<experiment>.csv only when it finishes, so an
interrupted benchmark resumes where it stopped: runs whose exact configuration already has a row
in any results CSV are skipped. run_all.sh is the front door.
"""
import argparse
import concurrent.futures as cf
import importlib
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
import pandas as pd

import common
import data as D

ROOT = os.path.dirname(os.path.abspath(__file__))
DATASETS = ["10X_PBMC", "mouse_bladder"]

# The paper's numbers (ARI, NMI, silhouette in %), quoted beside ours in every table.
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
# What to run: (experiment, row label, script, arguments)
# ---------------------------------------------------------------------------------------------
T1_METHODS = [("FedSimCLR", "fedsimclr.py", []), ("FedMoCoV1", "fedmoco.py", ["--version", "1"]),
              ("FedMoCoV2", "fedmoco.py", ["--version", "2"]), ("FedSimSiam", "fedsimsiam.py", []),
              ("FedBYOL", "fedbyol.py", []), ("FedSC", "fedsc.py", [])]
T1_CENTRAL = [("PCA-50 + KMeans (centralized)", "centralized.py", ["--baseline", "pca"]),
              ("PCA-raw (paper)", "centralized.py", ["--baseline", "pca_raw"]),
              ("contrastive-sc", "centralized.py", ["--baseline", "csc"]),
              ("SimCLR, one client (centralized)", "fedsimclr.py", ["--clients", "1", "--partition", "iid"])]
IMPROVE_DATASETS = ["10X_PBMC"]  # add "mouse_bladder" for the second benchmark
IMPROVE = [("paper protocol (linear predictor)", []), ("MLP predictor 128-512-128", ["--predictor", "mlp"])]
T2_ROWS = [((1, 0, 0), ["--no-ema", "--no-sg"]), ((1, 1, 0), ["--no-sg"]), ((1, 0, 1), ["--no-ema"]),
           ((0, 1, 1), ["--no-predictor"]), ((1, 1, 1), [])]


def plan(experiment, seeds):
    runs = []
    if experiment == "table1":
        for ds in DATASETS:
            for label, script, extra in T1_METHODS + T1_CENTRAL:
                runs += [(label, script, ["--data", ds] + extra, s) for s in seeds]
    elif experiment == "table2":
        for flags, extra in T2_ROWS:
            runs += [(flags, "fedbyol.py", ["--data", "10X_PBMC"] + extra, s) for s in seeds]
    elif experiment == "table3":
        for c in (1, 2, 4, 8):
            runs += [(c, "fedsc.py", ["--data", "mouse_bladder", "--types-per-client", str(c)], s) for s in seeds]
    elif experiment == "fig3":
        for r in (100, 200, 300, 400, 500):
            runs += [(("rounds", r), "fedbyol.py", ["--data", "10X_PBMC", "--rounds", str(r)], s) for s in seeds]
        for e in (5, 10, 25, 50, 100):
            runs += [(("local_epochs", e), "fedbyol.py", ["--data", "10X_PBMC", "--local-epochs", str(e)], s)
                     for s in seeds]
    elif experiment == "improve":
        for ds in IMPROVE_DATASETS:
            for label, extra in IMPROVE:
                runs += [(label, "fedsc.py", ["--data", ds] + extra, s) for s in seeds]
    else:
        raise SystemExit(f"unknown experiment '{experiment}': use table1, table2, table3, fig3 or improve")
    return runs


def applicable(script, overrides):
    """The (flag, value) pairs of overrides that this script has (e.g. --epochs is csc-only)."""
    fields = {f"--{n.replace('_', '-')}" for n in importlib.import_module(script[:-3]).Args.__dataclass_fields__}
    pairs = zip(overrides[::2], overrides[1::2])
    return [x for flag, value in pairs if flag in fields for x in (flag, value)]


def resolved(script, argv):
    """The method file's own argument parsing, so the config id matches the row it will write."""
    mod = importlib.import_module(script[:-3])
    args = common.parse_args(mod.Args, argv)
    names = {"fedsimclr.py": "FedSimCLR", "fedsimsiam.py": "FedSimSiam", "fedbyol.py": "FedBYOL",
             "fedsc.py": "FedSC", "fedmoco.py": f"FedMoCoV{getattr(args, 'version', 1)}"}
    if script == "centralized.py":
        names[script] = {"pca": "PCA", "pca_raw": "PCA-raw (paper)", "csc": "contrastive-sc"}[args.baseline]
    return common.resolve(args, names[script])


def matching(df, args):
    """Rows of df that ran with exactly these arguments (a column a row lacks must be at its
    default; where the run's output went and its thread count do not matter)."""
    keep = pd.Series(True, index=df.index)
    defaults = {f.name: f.default for f in type(args).__dataclass_fields__.values()}
    for k, v in vars(args).items():
        if k in ("out", "threads"):
            continue
        if k not in df:
            if v != defaults.get(k, v):
                return df.iloc[:0]
            continue
        col = df[k]
        if isinstance(v, bool):
            keep &= col.astype(str) == str(v)
        elif isinstance(v, (int, float)):
            keep &= np.isclose(pd.to_numeric(col, errors="coerce"), v, rtol=1e-9, atol=0)
        else:
            keep &= col.fillna("").astype(str) == str(v)
    return df[keep]


def all_rows(results):
    frames = [pd.read_csv(os.path.join(results, f)) for f in sorted(os.listdir(results))
              if f.endswith(".csv")] if os.path.isdir(results) else []
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def run_one(script, argv, log):
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, os.path.join(ROOT, script)] + argv, stdout=f,
                             stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    tail = open(log).read().strip().splitlines()[-3:]
    final = next((l for l in tail if l.startswith("final")), "")
    ari = re.search(r"ari ([-\d.]+)", final)
    return rc, time.time() - t0, ari.group(1) if ari else "-"


def execute(experiments, seeds, jobs, results, overrides):
    todo, seen, skipped = [], set(), 0
    df = all_rows(results)
    for exp in experiments:
        for label, script, argv, seed in plan(exp, seeds):
            argv = (argv + ["--seed", str(seed), "--threads", "1", "--out", os.path.join(results, f"{exp}.csv")]
                    + applicable(script, overrides))
            args = resolved(script, argv)
            cid = common.config_id(args)
            if len(matching(df, args)):
                skipped += 1
                continue
            if cid in seen:
                continue
            seen.add(cid)
            todo.append((exp, script, argv))
    print(f"{len(todo)} runs to do, {skipped} already have a row in {results}; {jobs} at a time", flush=True)
    os.makedirs(os.path.join(results, "logs"), exist_ok=True)
    t0, finished, failed = time.time(), 0, 0
    with cf.ThreadPoolExecutor(jobs) as pool:
        futures = {}
        for i, (exp, script, argv) in enumerate(todo):
            log = os.path.join(results, "logs", f"{exp}_{i:03d}_{script[:-3]}.log")
            futures[pool.submit(run_one, script, argv, log)] = (exp, script, argv, log)
        for fut in cf.as_completed(futures):
            exp, script, argv, log = futures[fut]
            rc, secs, ari = fut.result()
            finished += 1
            failed += rc != 0
            left = (time.time() - t0) / finished * (len(todo) - finished)
            what = " ".join(a for a in argv[:argv.index("--threads")])
            status = f"ARI {ari}" if rc == 0 else f"FAILED (exit {rc}, see {log})"
            print(f"[{finished}/{len(todo)}] {exp} {script} {what}: {secs:.0f}s {status}  "
                  f"(~{left / 60:.0f} min left)", flush=True)
    print(f"{finished} runs in {(time.time() - t0) / 60:.1f} min, {failed} failed", flush=True)
    return failed


# ---------------------------------------------------------------------------------------------
# Tables: mean ± std over seeds, built only from the results CSVs
# ---------------------------------------------------------------------------------------------
def rows_for(df, script, argv, seeds, overrides=()):
    argv = argv + applicable(script, list(overrides))
    return pd.concat([matching(df, resolved(script, argv + ["--seed", str(s)])) for s in seeds])


def cell(r, metric):
    v = r[metric].to_numpy(dtype=float)
    if len(v) == 0:
        return "–"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def fmt(nums):
    return " / ".join(f"{x:.2f}" for x in nums)


def secs(r):
    return f"{r['seconds'].mean():.0f}" if len(r) else "–"


def table1(df, seeds, overrides):
    out = ["| method | PBMC ARI | PBMC NMI | PBMC Sil | paper PBMC ARI / NMI / Sil | s/run | "
           "bladder ARI | bladder NMI | bladder Sil | paper bladder ARI / NMI / Sil | s/run |",
           "|---|" + "---|" * 10]
    for label, script, extra in T1_METHODS + T1_CENTRAL:
        line = f"| {label} |"
        for i, ds in enumerate(DATASETS):
            r = rows_for(df, script, ["--data", ds] + extra, seeds, overrides)
            paper = PAPER_T1.get(label)
            line += "".join(f" {cell(r, m)} |" for m in ("ari", "nmi", "sil"))
            line += f" {fmt(paper[i]) if paper else '–'} | {secs(r)} |"
        out.append(line)
    return "\n".join(out)


def table2(df, seeds, overrides):
    mark = {1: "✓", 0: "✗"}
    out = ["| predictor | EMA | stop-grad | ARI | NMI | Sil | paper ARI / NMI / Sil | s/run |", "|" + "---|" * 8]
    for flags, extra in T2_ROWS:
        r = rows_for(df, "fedbyol.py", ["--data", "10X_PBMC"] + extra, seeds, overrides)
        out.append(f"| {' | '.join(mark[f] for f in flags)} |" + "".join(f" {cell(r, m)} |" for m in ("ari", "nmi", "sil"))
                   + f" {fmt(PAPER_T2[flags])} | {secs(r)} |")
    return "\n".join(out)


def table3(df, seeds, overrides):
    out = ["| types per client | ARI | NMI | Sil | paper ARI / NMI / Sil | s/run |", "|" + "---|" * 6]
    for c in (1, 2, 4, 8):
        r = rows_for(df, "fedsc.py", ["--data", "mouse_bladder", "--types-per-client", str(c)], seeds, overrides)
        out.append(f"| {c} |" + "".join(f" {cell(r, m)} |" for m in ("ari", "nmi", "sil"))
                   + f" {fmt(PAPER_T3[c])} | {secs(r)} |")
    return "\n".join(out)


def fig3_table(df, seeds, overrides):
    out = ["| setting | ARI | NMI | Sil | s/run |", "|" + "---|" * 5]
    for label, script, argv, s in plan("fig3", seeds[:1]):
        r = rows_for(df, script, argv, seeds, overrides)
        out.append(f"| {label[0]} = {label[1]} |" + "".join(f" {cell(r, m)} |" for m in ("ari", "nmi", "sil"))
                   + f" {secs(r)} |")
    return "\n".join(out)


def improve_table(df, seeds, overrides):
    out = ["| FedSC setting |" + "".join(f" {ds} ARI | {ds} NMI | {ds} Sil | s/run |" for ds in IMPROVE_DATASETS),
           "|" + "---|" * (1 + 4 * len(IMPROVE_DATASETS))]
    for label, extra in IMPROVE:
        line = f"| {label} |"
        for ds in IMPROVE_DATASETS:
            r = rows_for(df, "fedsc.py", ["--data", ds] + extra, seeds, overrides)
            line += "".join(f" {cell(r, m)} |" for m in ("ari", "nmi", "sil")) + f" {secs(r)} |"
        out.append(line)
    return "\n".join(out)


BUILDERS = {"table1": table1, "table2": table2, "table3": table3, "fig3": fig3_table, "improve": improve_table}


def write_tables(experiments, seeds, results, overrides, note):
    df = all_rows(results)
    if df.empty:
        print("no results yet", flush=True)
        return {}
    tables = {}
    for exp in experiments:
        md = BUILDERS[exp](df, seeds, overrides)
        with open(os.path.join(results, f"{exp}.md"), "w") as f:
            f.write(md + "\n\n" + note + "\n")
        tables[exp] = md
        print(f"\n{exp}\n{md}", flush=True)
    return tables


def provenance(results, experiments):
    """Which data, code commit and machine the tables come from, and how long their runs took."""
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    df = all_rows(results)
    total = df["seconds"].sum() / 3600 if "seconds" in df else 0
    files = ", ".join(f"`{b['file']}` (sha256 {b['sha256'][:12]}…)" for b in D.BENCHMARKS.values())
    return (f"Data: {files}. Code: commit `{commit}`. Runs: {len(df)} in {total:.1f} CPU-hours "
            f"(sum of per-run wall times, one torch thread each, {platform.machine()}, "
            f"torch {df['torch'].iloc[0] if 'torch' in df and len(df) else '?'}).")


def update_readme(tables, note):
    """Replace the README block between the results markers with the generated tables."""
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        print("README.md has no results markers; left it alone", flush=True)
        return
    titles = {"table1": "Table 1: federated methods and centralized references (mean ± std over seeds)",
              "table2": "Table 2: FedBYOL ablation on 10X PBMC",
              "table3": "Table 3: FedSC on mouse bladder, cell types per client",
              "fig3": "Figure 3 sweep: FedBYOL on 10X PBMC, rounds and local epochs",
              "improve": "Beyond the paper: FedSC with other settings (same protocol otherwise)"}
    body = "\n\n".join(f"**{titles[k]}**\n\n{v}" for k, v in tables.items())
    figs = [f for f in ("table1.png", "fig3.png", "fedsc_pbmc_map.png")
            if os.path.exists(os.path.join(ROOT, "results", "figures", f))]
    body += "".join(f"\n\n![{f[:-4]}](results/figures/{f})" for f in figs)
    block = f"{start}\n<!-- written by benchmark.py from results/*.csv; do not edit by hand -->\n\n{body}\n\n{note}\n{end}"
    text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    open(path, "w").write(text)
    print("README.md results section updated", flush=True)


def figures(results, tables, seeds, overrides):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures (pip install matplotlib)", flush=True)
        return
    df = all_rows(results)
    fig_dir = os.path.join(results, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    if "table1" in tables:  # grouped bars: ARI per method, PBMC and bladder
        fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=False)
        for ax, ds in zip(axes, DATASETS):
            labels, means, stds, paper = [], [], [], []
            for label, script, extra in T1_METHODS + T1_CENTRAL:
                r = rows_for(df, script, ["--data", ds] + extra, seeds, overrides)
                if len(r):
                    labels.append(label.replace(" (centralized)", "*"))
                    means.append([r[m].mean() for m in ("ari", "nmi", "sil")])
                    stds.append([r[m].std(ddof=1) if len(r) > 1 else 0 for m in ("ari", "nmi", "sil")])
                    paper.append(PAPER_T1[label][DATASETS.index(ds)][0] if label in PAPER_T1 else np.nan)
            x = np.arange(len(labels))
            ax.scatter(x - 0.27, paper, marker="_", s=250, color="k", zorder=3, label="paper ARI")
            for j, m in enumerate(("ARI", "NMI", "Silhouette")):
                ax.bar(x + (j - 1) * 0.27, [v[j] for v in means], 0.27, yerr=[v[j] for v in stds], label=m)
            ax.set_xticks(x, labels, rotation=40, ha="right", fontsize=8)
            ax.set_title(ds)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(fig_dir, "table1.png"), dpi=120)
        plt.close(fig)
    if "fig3" in tables:  # Figure 3: metrics against rounds and against local epochs
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, (name, values) in zip(axes, [("rounds", (100, 200, 300, 400, 500)),
                                              ("local_epochs", (5, 10, 25, 50, 100))]):
            for m in ("ari", "nmi", "sil"):
                pts = [(v, rows_for(df, "fedbyol.py", ["--data", "10X_PBMC", f"--{name.replace('_', '-')}", str(v)],
                                    seeds, overrides)[m]) for v in values]
                pts = [(v, r.mean(), r.std(ddof=1) if len(r) > 1 else 0) for v, r in pts if len(r)]
                if pts:
                    ax.errorbar(*zip(*pts), marker="o", capsize=3, label=m.upper())
            ax.set_xlabel(name.replace("_", " "))
            ax.legend(fontsize=8)
        axes[0].set_title("FedBYOL, 10X PBMC")
        fig.tight_layout()
        fig.savefig(os.path.join(fig_dir, "fig3.png"), dpi=120)
        plt.close(fig)
    fedsc = df[(df["method"] == "FedSC") & (df["data"] == "10X_PBMC")] if "method" in df else df.iloc[:0]
    run_dir = next((os.path.join(results, "runs", r) for r in fedsc.get("run", [])
                    if os.path.exists(os.path.join(results, "runs", r, "embedding.npy"))), None)
    if run_dir:  # 2-D PCA map of a FedSC embedding, coloured by true type and by cluster
        from sklearn.decomposition import PCA
        h = np.load(os.path.join(run_dir, "embedding.npy"))
        cl = pd.read_csv(os.path.join(run_dir, "clusters.csv"))
        xy = PCA(2, random_state=0).fit_transform(h)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for ax, col in zip(axes, ("label", "cluster")):
            ax.scatter(xy[:, 0], xy[:, 1], c=cl[col], s=3, cmap="tab20")
            ax.set_title(f"FedSC embedding (PCA), coloured by {'true type' if col == 'label' else 'KMeans cluster'}")
            ax.set_xticks([]), ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(os.path.join(fig_dir, "fedsc_pbmc_map.png"), dpi=120)
        plt.close(fig)
    print(f"figures in {fig_dir}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="*", default=["table1"], help="table1 table2 table3 fig3 improve")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each")
    p.add_argument("--quick", action="store_true",
                   help="every row with 3 rounds of 1 local epoch and one seed, into results/quick/")
    p.add_argument("--results", default=os.path.join(ROOT, "results"))
    p.add_argument("--tables-only", action="store_true", help="only rebuild tables, figures and README")
    a = p.parse_args()
    overrides, results = [], a.results
    if a.quick:
        overrides, results = ["--rounds", "3", "--local-epochs", "1", "--epochs", "3"], os.path.join(a.results, "quick")
        a.seeds = a.seeds if a.seeds != [0, 1, 2] else [0]
    failed = 0
    if not a.tables_only:
        failed = execute(a.experiments, a.seeds, a.jobs, results, overrides)
    tables = write_tables(a.experiments, a.seeds, results, overrides, provenance(results, a.experiments))
    figures(results, tables, a.seeds, overrides)
    if tables and not a.quick and results == os.path.join(ROOT, "results"):
        # the README shows every experiment that has results, not only the ones just run
        df = all_rows(results)
        # (fig3 shares its default point, twice, with table1: it shows once another point ran)
        def settings_run(exp):  # distinct settings of exp with at least one row
            return len({str(argv) for _, script, argv, s in plan(exp, a.seeds)
                        if len(matching(df, resolved(script, argv + ["--seed", str(s)])))})
        shown = {exp: BUILDERS[exp](df, a.seeds, overrides) for exp in BUILDERS
                 if settings_run(exp) > (2 if exp == "fig3" else 0)}
        update_readme(shown, provenance(results, a.experiments))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
