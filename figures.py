"""The class's picture of the problem (`python benchmark.py map`): FedBYOL's final embedding on 10X
PBMC, non-IID without and with the PCA anchor and IID, each drawn in its first two principal
components and coloured by cell type (top) and by client (bottom). It runs the three runs (tuned
recipe, seed 0, one thread each, two at a time; about 5 minutes) into a temporary folder, draws
results/figures/map.png and writes the `map` block of docs/results.md."""
import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.abspath(__file__))
PANELS = [("non-IID (the paper's split)", []), ("non-IID + PCA anchor", ["--anchor", "1"]),
          ("IID, 4 clients", ["--partition", "iid"])]
BASE = ["fedbyol.py", "--data", "10X_PBMC", "--recipe", "tuned", "--seed", "0", "--threads", "1"]


def one_run(argv, out):
    """Run a method file; return its run folder (the row's `run`, beside --out) and its ARI."""
    done = subprocess.run([sys.executable] + argv + ["--out", out], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv)} failed:\n{done.stderr.strip()[-800:]}")
    row = pd.read_csv(out).iloc[-1]
    return os.path.join(os.path.dirname(out), "runs", row["run"]), float(row["ari"])


def pca2(h):
    h = h - h.mean(0)
    _, _, vt = np.linalg.svd(h, full_matrices=False)
    return h @ vt[:2].T


def draw(panels, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 9))
    for j, (title, folder, ari) in enumerate(panels):
        xy = pca2(np.load(os.path.join(folder, "embedding.npy")))
        cells = pd.read_csv(os.path.join(folder, "clusters.csv"))
        for i, (col, cmap) in enumerate((("label_name", "tab10"), ("client", "Set1"))):
            ax, groups = axes[i, j], sorted(cells[col].astype(str).unique())
            for g_i, g in enumerate(groups):
                at = cells[col].astype(str).values == g
                ax.scatter(xy[at, 0], xy[at, 1], s=2, color=plt.get_cmap(cmap)(g_i % 10),
                           label=f"{'type' if i == 0 else 'client'} {g}")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{title}: ARI {ari:.1f}\ncoloured by {'cell type' if i == 0 else 'client'}", fontsize=10)
            ax.legend(fontsize=7, markerscale=4, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv):
    import cli  # its Parser: an argument error is one `error:` line
    import common  # noqa: F401 (puts back the Ctrl-C handlers that importing cli replaces)
    p = cli.Parser(prog="benchmark.py map", description=__doc__)
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    import benchmark
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        todo = [BASE + extra for _, extra in PANELS]
        outs = [os.path.join(tmp, f"p{i}", "map.csv") for i in range(len(PANELS))]
        with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
            done = list(pool.map(one_run, todo, outs))
        panels = [(title, folder, ari) for (title, _), (folder, ari) in zip(PANELS, done)]
        draw(panels, os.path.join(ROOT, "results", "figures", "map.png"))
        meta = json.load(open(os.path.join(panels[0][1], "result.json")))
        wall = time.time() - start
    runs = "; ".join(f"`python {' '.join(c)}`" for c in todo)
    body = (f"![FedBYOL's embedding on 10X PBMC](results/figures/map.png)\n\nFedBYOL's final embedding f(x) on "
            f"10X PBMC in its first two principal components, coloured by cell type (top) and by client (bottom); "
            f"seed 0, tuned recipe ({meta['rounds']} rounds x {meta['local_epochs']} local epochs). Runs: {runs} "
            f"({wall:.0f} s of wall time, {a.jobs} at a time). Under the paper's split each client holds two types "
            f"and no local loss separates types held by different clients.")
    benchmark.readme_block("map", body, "figures.py (python benchmark.py map)")
    print(f"wrote results/figures/map.png ({wall:.0f} s)")
    return 0
