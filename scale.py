"""How preprocessing, a FedSC round and the evaluation grow with the number of cells.

    python scale.py [--sizes 10000 30000 100000] [--genes 20000]

For each size, a fresh subprocess (so its peak memory is its own) builds synthetic sparse raw counts
(cells x genes, ~5% non-zero, a few cell types), then times data.preprocess(X, 2000) with its peak
RSS, one FedSC round of the paper's protocol (4 clients, 2 types each, 5 local epochs, batch 128,
one torch thread) and common.cluster_metrics on the embedding. Writes results/scale.md.
Goals: 100k cells preprocessed in < 60 s and < 4 GB; a round's time linear in the cells.
"""
import argparse
import contextlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import scipy.sparse as sp
from scipy.optimize import brentq

import data as D

ROOT = os.path.dirname(os.path.abspath(__file__))
N_TYPES, N_HVG, DENSITY, CHUNK = 8, 2000, 0.05, 2000  # 8 types = 4 clients x 2 types, each used once


def synthetic_sparse(n_cells, n_genes, seed=0):
    """Raw counts as a CSR matrix (float32 integer counts, int32 indices) with N_TYPES cell types:
    each cell draws its reads from its type's gene distribution (a log-normal baseline per gene,
    4x on the type's 200 program genes: the HVGs to find), ~DENSITY of the genes end up non-zero.
    Built CHUNK cells at a time into arrays allocated once: the matrix is the only large allocation."""
    rng = np.random.default_rng(seed)  # everything below is seeded: the same matrix every run
    y = rng.integers(0, N_TYPES, n_cells)
    w = np.tile(rng.lognormal(0.0, 1.0, n_genes), (N_TYPES, 1))
    for t in range(N_TYPES):
        w[t, rng.choice(n_genes, 200, replace=False)] *= 4.0
    p = w / w.sum(1, keepdims=True)
    # reads per cell for DENSITY non-zero on average (expected distinct genes among r reads)
    reads = brentq(lambda r: (1 - np.exp(-r * p)).sum(1).mean() - DENSITY * n_genes, 1, 1e3 * n_genes)
    cdf = np.cumsum(p, 1)
    cdf[:, -1] = 1.0
    cap = n_cells * int(1.4 * reads + 1)  # upper bound; the untouched tail of np.empty is never resident
    data, indices = np.empty(cap, np.float32), np.empty(cap, np.int32)
    indptr, nnz = np.zeros(n_cells + 1, np.int64), 0
    for lo in range(0, n_cells, CHUNK):
        hi = min(lo + CHUNK, n_cells)
        lib = (reads * rng.uniform(0.6, 1.4, hi - lo)).astype(int)  # library sizes vary +-40%
        u = rng.random((hi - lo, lib.max()))
        u[np.arange(lib.max()) >= lib[:, None]] = 2.0  # past the cell's library: gene n_genes, dropped
        u.sort(1)  # sorted reads -> each row's genes come out sorted
        genes = np.empty(u.shape, np.int32)
        for t in range(N_TYPES):
            genes[y[lo:hi] == t] = np.searchsorted(cdf[t], u[y[lo:hi] == t])
        first = np.ones(genes.shape, bool)  # the first read of each (cell, gene): its run length is the count
        first[:, 1:] = genes[:, 1:] != genes[:, :-1]
        first = np.flatnonzero(first)
        count, gene = np.diff(np.append(first, genes.size)), genes.ravel()[first]
        ok = gene < n_genes
        m = ok.sum()
        data[nnz:nnz + m], indices[nnz:nnz + m] = count[ok], gene[ok]
        indptr[lo + 1:hi + 1] = nnz + np.cumsum(np.bincount(first[ok] // genes.shape[1], minlength=hi - lo))
        nnz += m
    X = sp.csr_matrix((data[:nnz], indices[:nnz], indptr.astype(np.int32 if nnz < 2 ** 31 else np.int64)),
                      shape=(n_cells, n_genes), copy=False)
    return X, y


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: kilobytes


def measure(n_cells, n_genes):
    """One size, in this (fresh) process: returns a dict of measurements."""
    X, y = synthetic_sparse(n_cells, n_genes)
    out = dict(cells=n_cells, genes=n_genes, nnz=X.nnz,
               input_mb=(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 2 ** 20, rss_before_gb=peak_rss_gb())
    t0 = time.perf_counter()
    Xp, cells, _ = D.preprocess(X, N_HVG)
    out.update(preprocess_s=time.perf_counter() - t0, peak_rss_gb=peak_rss_gb())
    del X
    # torch is imported only now, so the preprocessing's peak above does not include it
    import torch
    import common
    import fedsc
    torch.set_num_threads(1)
    args = common.parse_args(fedsc.Args, ["--rounds", "1", "--types-per-client", "2", "--n-genes", str(N_HVG)])
    y = y[cells]
    data = D.Data(Xp, y, D.partition(y, args.clients, "class", 2, seed=0), N_TYPES, cells)
    torch.manual_seed(0)
    model = fedsc.make_model(Xp.shape[1], args)
    with contextlib.redirect_stdout(io.StringIO()):  # federate's per-round lines
        t0, c0 = time.perf_counter(), time.process_time()
        common.federate(args, data, model, fedsc.download, fedsc.local_update, fedsc.upload, fedsc.aggregate)
        out.update(round_s=time.perf_counter() - t0, round_cpu_s=time.process_time() - c0)
    h = common.embed(args, model, Xp)
    t0 = time.perf_counter()
    common.cluster_metrics(h, y, N_TYPES, args.seed)
    out.update(eval_s=time.perf_counter() - t0, kept_cells=len(Xp))
    return out


def table(rows, command, wall):
    import torch  # only for its version
    lines = [f"Generated by `{command}` on {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
             f"OMP_NUM_THREADS=1, load average {os.getloadavg()[0]:.1f} at the end, one size per fresh subprocess; "
             f"synthetic counts, {N_TYPES} cell types, {N_HVG} HVGs; a round = FedSC, 4 clients x 2 types, "
             f"5 local epochs, batch 128.", "",
             "| cells | genes | non-zeros | input MB | RSS before GB | preprocess s | peak RSS GB | round s "
             "| s per 1000 cells per round | evaluation s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cells']} | {r['genes']} | {r['nnz']:,} | {r['input_mb']:.0f} | {r['rss_before_gb']:.2f} "
                     f"| {r['preprocess_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['round_s']:.1f} "
                     f"| {1000 * r['round_s'] / r['kept_cells']:.3f} | {r['eval_s']:.1f} |")
    lo, hi = rows[0], rows[-1]
    if len(rows) > 1:
        grow = lambda k: f"{hi[k] / lo[k]:.1f}"
        lines += ["", f"Growth {hi['cells']}/{lo['cells']} cells (linear would be {hi['cells'] / lo['cells']:.1f}): "
                      f"preprocess x{grow('preprocess_s')}, round x{grow('round_s')} "
                      f"(its CPU time x{grow('round_cpu_s')}), evaluation x{grow('eval_s')}."]
    big = next((r for r in rows if r["cells"] == 100000), None)
    if big:
        ok = lambda good: "met" if good else "MISSED"
        lines += ["", f"Goals at 100000 cells: preprocess < 60 s {ok(big['preprocess_s'] < 60)} "
                      f"({big['preprocess_s']:.1f} s); peak RSS < 4 GB {ok(big['peak_rss_gb'] < 4)} "
                      f"({big['peak_rss_gb']:.2f} GB)."]
    lines += ["", f"Whole benchmark: {wall:.0f} s wall time. "
                  f"RSS before = peak RSS once the input matrix is built (with the interpreter); peak RSS = after "
                  f"data.preprocess(X, {N_HVG}); evaluation = common.cluster_metrics (KMeans n_init=10, "
                  f"silhouette on 5000 cells); MB, GB = 2^20, 2^30 bytes."]
    return "\n".join(lines)


def main():
    import cli  # its Parser: an argument error is one `error:` line
    import common  # noqa: F401 (puts back the Ctrl-C handlers that importing cli replaces)
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 30000, 100000])
    p.add_argument("--genes", type=int, default=20000)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # internal: measure one size, print JSON
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child, a.genes)))
        return
    t_start, rows = time.perf_counter(), []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for n in sorted(a.sizes):  # one at a time: each size in its own process
        run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n), "--genes", str(a.genes)],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"size {n} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(f"{n} cells done: {rows[-1]}", flush=True)
    md = table(rows, " ".join(["python scale.py"] + sys.argv[1:]), time.perf_counter() - t_start)
    print(md)
    import benchmark
    benchmark.publish("scale", md, "scale.py")


if __name__ == "__main__":
    main()
