"""A run's outputs and provenance: its folder (embedding, clusters, per-round log, result.json,
per-site .h5ad), its results row, and the hashes that say which code and data produced it. Support
code, not the lesson.

    save_run      the run's folder, each file atomically, then the results row last
    append_row    one CSV row under a lock, by rename: never a half-written row
    code_hash     sha256 of a script and the modules of its folder that it imports
    config_id     a hash of every argument that can change a result
"""
import ast
import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import time

import numpy as np
import torch

import formats

ROOT = os.path.dirname(os.path.abspath(__file__))
TEXT_COLUMNS = {k: str for k in ("code", "config_id", "commit", "data_sha256", "genes_sha", "run", "mu_by_round", "div_by_round", "code_commit", "rehash_verified")}  # hashes stay text


def save_run(args, data, log, status, metrics=None, h=None, pred=None):
    """Write the run's folder (embedding, clusters with the input's row numbers and label names,
    per-round log, result.json), each file atomically, then append the results row last: a row
    means a whole run. A diverged run gets a row too, with status 'diverged' and no metrics."""
    import pandas as pd
    import common
    run_dir = run_folder(args)
    if h is not None:
        formats.write_atomic(os.path.join(run_dir, "embedding.npy"),
                      lambda tmp: np.save(open(tmp, "wb"), h.astype(np.float32)))
    if pred is not None:
        client = np.full(len(data.X), -1)
        for k, idx in enumerate(data.parts):
            client[idx] = k
        table = {"cell": data.cells} | ({} if data.barcodes is None else {"barcode": data.barcodes})
        table["client"] = client
        if data.y is not None:
            table["label"] = data.y
            if data.label_names is not None:
                table["label_name"] = data.label_names[data.y]
        table["cluster"] = pred
        formats.write_atomic(os.path.join(run_dir, "clusters.csv"), lambda tmp: pd.DataFrame(table).to_csv(tmp, index=False))
    if log:
        formats.write_atomic(os.path.join(run_dir, "rounds.csv"), lambda tmp: pd.DataFrame(log).to_csv(tmp, index=False))
    if pred is not None and getattr(args, "sites", None):  # each site gets its own cells back, annotated
        key = args.method.lower()
        for k, (site, idx) in enumerate(zip(args.sites, data.parts)):
            names = data.cells[idx].astype(str) if data.barcodes is None else data.barcodes[idx]
            columns = {f"{key}_cluster": pred[idx]} | ({} if data.y is None else {"cell_type": data.label_names[data.y[idx]]})
            formats.write_h5ad(os.path.join(run_dir, f"site{k}_{os.path.basename(site).split('.')[0]}.h5ad"),
                         data.X[idx], names, getattr(data, "genes", np.arange(data.X.shape[1])).astype(str), columns,
                         {f"X_{key}": h[idx].astype(np.float32)}, {f"{key}_config": json.dumps(vars(args))})
    metrics = metrics or {}
    traces = {}  # per-round means of what the method logs per client (FedSC: mu and div), in the row
    if log:
        frame = pd.DataFrame(log)
        for k in sorted(set(frame.columns) - {"round", "client", "lr", "loss"}):
            traces[f"{k}_by_round"] = " ".join(f"{v:.4g}" for v in frame.groupby("round")[k].mean())
    hvg = None if data.hvg is None else hashlib.sha256(np.asarray(data.hvg, np.int64).tobytes()).hexdigest()[:12]
    row = {**vars(args), **metrics, **traces, "genes_sha": hvg, "collapsed": h is not None and common.collapsed(h, metrics["erank"]), "status": status,
           "seconds": round(time.time() - data.t_start, 2), "torch": torch.__version__,
           "commit": git_commit(),
           "config_id": config_id(args), "run": os.path.basename(run_dir)}
    formats.write_atomic(os.path.join(run_dir, "result.json"), lambda tmp: json.dump(row, open(tmp, "w"), indent=1))
    append_row(args.out, row)
    print(f"wrote a row to {args.out} and the run's files to {run_dir}", flush=True)
    return metrics


def append_row(path, row):
    """Append one row to a CSV under a lock, by writing a new file and renaming it over the old:
    an interrupted or parallel run never leaves a half-written row."""
    import pandas as pd
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _locked(path + ".lock"):
        old = pd.read_csv(path, dtype=str, keep_default_na=False) if os.path.exists(path) else pd.DataFrame()
        new = pd.concat([old, pd.DataFrame([row])], ignore_index=True)
        formats.write_atomic(path, lambda tmp: new.to_csv(tmp, index=False))


@contextlib.contextmanager
def _locked(lock_path):
    with open(lock_path, "a+") as lock:
        if os.name == "nt":  # Windows
            import msvcrt
            msvcrt.locking(lock.fileno(), msvcrt.LK_LOCK, 1)
        else:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_folder(args):
    """A fresh folder for this run's files: no spaces, never shared with a concurrent run."""
    import re
    data_name = "sites" if getattr(args, "sites", None) else os.path.basename(str(args.data)).split('.')[0]
    name = f"{data_name}__{args.method}__s{args.seed}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    runs = os.path.join(os.path.dirname(os.path.abspath(args.out)), "runs")
    os.makedirs(runs, exist_ok=True)
    return tempfile.mkdtemp(prefix=name + "__" + time.strftime("%Y%m%d-%H%M%S") + "__", dir=runs)


def code_hash(script):
    """sha256 (12 hex digits) of a script and of every module of its folder that it imports,
    transitively: a results row is reused only while the code that produced it is unchanged."""
    folder, seen, todo = os.path.dirname(os.path.abspath(script)), {}, [os.path.abspath(script)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = open(path, "rb").read()
        for node in ast.walk(ast.parse(seen[path])):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            todo += [p for p in (os.path.join(folder, n.split(".")[0] + ".py") for n in names) if os.path.exists(p)]
    h = hashlib.sha256()
    for path in sorted(seen):
        h.update(os.path.basename(path).encode() + b"\0" + seen[path])
    return h.hexdigest()[:12]


def git_commit():
    """The commit a run's code comes from, +modified when the checkout differs from it."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "--short", "HEAD")
        if head.returncode:
            return "unknown"
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", "*.py").stdout.strip()
        return head.stdout.strip() + ("+modified" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_id(args):
    """A hash of everything that can change a result: every argument (not where the row goes, not
    the thread count), the data file's sha256 and the code hash."""
    keep = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "threads")}
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]
