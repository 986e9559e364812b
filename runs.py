"""A run's outputs and provenance: its folder (embedding, clusters, per-round log, result.json,
per-site .h5ad), its results row, and the hashes that say which code and data produced it. Support
code, not the lesson.

    save_run      the run's folder under a temporary name, renamed whole, then the results row:
                  an interrupt leaves a whole run (folder and row) or nothing
    append_row    one CSV row under a lock, by rename: never a half-written row
    read_rows     a results CSV as append_row reads it (cli.check_out reads it so before training)
    code_hash     sha256 of a script and the modules of its folder that it imports
    config_id     a hash of every argument that can change a result
"""
import ast
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import numpy as np
import torch

import formats
from data import DataError

ROOT = os.path.dirname(os.path.abspath(__file__))
saved = None  # the folder of the run this process saved whole, for the message of a later Ctrl-C
TEXT_COLUMNS = {k: str for k in ("code", "config_id", "commit", "data_sha256", "genes_sha", "run", "mu_by_round", "div_by_round", "code_commit", "rehash_verified")}  # hashes stay text


def save_run(args, data, log, status, metrics=None, h=None, pred=None):
    """Write the run's folder (embedding, clusters with the input's row numbers and label names,
    per-round log, result.json) under a temporary name, rename it whole, then append the results
    row: a row means a whole run. Interrupted at any point, it leaves the folder and the row, or
    neither. A diverged run gets a row too, with status 'diverged' and no metrics."""
    global saved
    stage = None
    try:
        with _signals_held():  # no Ctrl-C between making the folder and knowing its name
            stage = run_folder(args, staged=True)
        run_dir = os.path.join(os.path.dirname(stage), os.path.basename(stage)[1:-len(".partial")])
        metrics, row = _write_run(stage, run_dir, args, data, log, status, metrics, h, pred)
        with _signals_held():  # from here the run lands whole; a Ctrl-C now takes effect once it has
            os.rename(stage, run_dir)
            try:
                append_row(args.out, row)
            except BaseException:  # the row is what commits the run: without it, no folder either
                if _has_row(args.out, row["run"]):
                    saved = run_dir
                else:
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
            saved = run_dir
    finally:
        if stage:
            shutil.rmtree(stage, ignore_errors=True)
    print(f"wrote a row to {args.out} and the run's files to {run_dir}", flush=True)
    return metrics


def _write_run(folder, run_dir, args, data, log, status, metrics, h, pred):
    """The run's files in folder; returns the metrics and the results row (which names run_dir)."""
    import pandas as pd
    import common
    if h is not None:
        formats.write_atomic(os.path.join(folder, "embedding.npy"),
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
        formats.write_atomic(os.path.join(folder, "clusters.csv"), lambda tmp: pd.DataFrame(table).to_csv(tmp, index=False))
    if log:
        formats.write_atomic(os.path.join(folder, "rounds.csv"), lambda tmp: pd.DataFrame(log).to_csv(tmp, index=False))
    if pred is not None and getattr(args, "sites", None):  # each site gets its own cells back, annotated
        key = args.method.lower()
        for k, (site, idx) in enumerate(zip(args.sites, data.parts)):
            names = data.cells[idx].astype(str) if data.barcodes is None else data.barcodes[idx]
            columns = {f"{key}_cluster": pred[idx]} | ({} if data.y is None else {"cell_type": data.label_names[data.y[idx]]})
            formats.write_h5ad(os.path.join(folder, f"site{k}_{os.path.basename(site).split('.')[0]}.h5ad"),
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
    formats.write_atomic(os.path.join(folder, "result.json"), lambda tmp: json.dump(row, open(tmp, "w"), indent=1))
    return metrics, row


def _has_row(out, run):
    try:
        rows = read_rows(out)
    except DataError:
        return False
    return "run" in rows and run in set(rows["run"])


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done (main thread only; elsewhere no signal lands)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum))
           for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if got:
        raise KeyboardInterrupt


def read_rows(path):
    """The rows of a CSV, as text: none for a missing or empty file. A file that cannot be read or
    parsed is a DataError."""
    import pandas as pd
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return pd.DataFrame()
    try:
        rows = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"--out '{path}' cannot be read as a results CSV ({' '.join(str(e).split())}); "
                        f"repair it or choose another file (rows are appended, never overwritten)") from None
    return rows


def append_row(path, row):
    """Append one row to a CSV under a lock, by writing a new file and renaming it over the old:
    an interrupted or parallel run never leaves a half-written row."""
    import pandas as pd
    path = os.path.realpath(path)  # a link to the CSV: the file it names gets the row
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _locked(path + ".lock"):
        new = pd.concat([read_rows(path), pd.DataFrame([row])], ignore_index=True)
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


def runs_dir(out):
    """The folder of the run folders: runs/ beside the results CSV."""
    return os.path.join(os.path.dirname(os.path.abspath(out)), "runs")


def run_folder(args, staged=False):
    """A fresh folder for this run's files: no spaces, never shared with a concurrent run. Staged:
    .<name>.partial, to be renamed <name> once whole."""
    import re
    data_name = "sites" if getattr(args, "sites", None) else os.path.basename(str(args.data)).split('.')[0]
    name = f"{data_name[:80]}__{args.method}__s{args.seed}"  # a folder name stays far below 255 bytes
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    runs = runs_dir(args.out)
    os.makedirs(runs, exist_ok=True)
    return tempfile.mkdtemp(prefix=("." if staged else "") + name + "__" + time.strftime("%Y%m%d-%H%M%S") + "__",
                            suffix=".partial" if staged else "", dir=runs)


_IMPORTS = {}  # (path, sha256 of its text) -> the modules it imports: parsed once per version of a file


def _imports(path, text):
    key = (path, hashlib.sha256(text).hexdigest())
    if key not in _IMPORTS:
        _IMPORTS[key] = [n.split(".")[0] for node in ast.walk(ast.parse(text))
                         for n in ([a.name for a in node.names] if isinstance(node, ast.Import)
                                   else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])]
    return _IMPORTS[key]


def code_hash(script):
    """sha256 (12 hex digits) of a script and of every module of its folder that it imports,
    transitively: a results row is reused only while the code that produced it is unchanged."""
    folder, seen, todo = os.path.dirname(os.path.abspath(script)), {}, [os.path.abspath(script)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = open(path, "rb").read()
        todo += [p for p in (os.path.join(folder, n + ".py") for n in _imports(path, seen[path])) if os.path.exists(p)]
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
