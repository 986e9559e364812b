"""Re-stamp results rows after a refactor, only when it is verified to change no result.

    python benchmark.py rehash [--suite full|quick] [--dry-run]

A results row is reused only while the hash of the code that produced it (the `code` column: the
script and every module of the folder it imports) is today's. A cleanup of the helpers changes
that hash without changing any result, and would throw every row away. This command:
  1. hashes every script as it was at --base (default: the commit before HEAD, e.g. the last one
     before a refactor) and finds the rows of results/*.csv that carry such a hash;
  2. runs a fingerprint suite (short runs of every script and option family, fixed seeds) under
     that commit's code and under today's committed code;
  3. only if every run's embedding, clusters, per-round log and metrics are bit-identical does it
     re-stamp the rows: `code` becomes today's hash, `code_commit` today's commit, and
     `rehash_verified` names the commit it was verified against. Otherwise it says which
     fingerprint moved and changes nothing.
New options of today's scripts get their default value in re-stamped rows (the fingerprint ran
with those defaults, so they reproduce the old behaviour).
"""
import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("fedsc.py", "fedbyol.py", "fedsimclr.py", "fedmoco.py", "fedsimsiam.py", "fedpca.py", "centralized.py")
SHORT = ["--rounds", "2", "--local-epochs", "1"]
# What may differ between two runs of the same code: where and when it ran, and the code's own stamps.
VOLATILE = {"seconds", "commit", "code", "config_id", "run", "out", "threads", "torch", "code_commit", "rehash_verified"}
FILES = ("embedding.npy", "clusters.csv", "rounds.csv")


def suite(name, data_dir):
    """(name, script, argv): short fixed-seed runs of every script and option family. 'quick' is the
    synthetic-data part only (for tests); 'full' adds the benchmark files that are present."""
    syn = ["--data", "{syn}"]
    runs = [(f"{s[:-3]}", s, syn + ([] if s == "fedpca.py" else SHORT)) for s in SCRIPTS if s != "centralized.py"]
    runs.append(("pca", "centralized.py", syn + ["--baseline", "pca"]))
    if name == "quick":  # one run per script
        return runs
    runs += [("fedmoco-v2", "fedmoco.py", syn + SHORT + ["--version", "2"]),
             ("fedsc-mu", "fedsc.py", syn + SHORT + ["--rounds", "3", "--mu-rule", "literal"]),
             ("fedsc-rel", "fedsc.py", syn + SHORT + ["--rounds", "3", "--mu-rule", "relative", "--eval-every", "1"]),
             ("fedsc-bnd", "fedsc.py", syn + SHORT + ["--rounds", "3", "--mu-rule", "bounded", "--predictor", "mlp"]),
             ("fedbyol-abl1", "fedbyol.py", syn + SHORT + ["--no-ema", "--no-sg"]),
             ("fedbyol-abl2", "fedbyol.py", syn + SHORT + ["--no-sg"]),
             ("fedbyol-abl3", "fedbyol.py", syn + SHORT + ["--no-predictor", "--tau-schedule", "cosine"]),
             ("fedsimclr-fed", "fedsimclr.py", syn + SHORT + ["--preprocess", "federated", "--evaluate", "both"]),
             ("fedsimclr-evalfed", "fedsimclr.py", syn + SHORT + ["--evaluate", "federated", "--bn-stats", "recompute"]),
             ("fedsimsiam-dir", "fedsimsiam.py", syn + SHORT + ["--partition", "dirichlet", "--embed", "head"]),
             ("fedsimclr-iid1", "fedsimclr.py", syn + SHORT + ["--partition", "iid", "--clients", "1"]),
             ("fedbyol-threads", "fedbyol.py", syn + SHORT + ["--threads", "2", "--lr-schedule", "constant"]),
             ("fedsc-sites", "fedsc.py", ["--sites", "{site0}", "{site1}"] + SHORT),
             ("fedpca-sites", "fedpca.py", ["--sites", "{site0}", "{site1}", "--evaluate", "both"]),
             ("pca_raw", "centralized.py", syn + ["--baseline", "pca_raw"]),
             ("csc", "centralized.py", syn + ["--baseline", "csc", "--epochs", "2"])]
    bench = {"10X_PBMC": "10X_PBMC_top2000.h5", "mouse_bladder": "mouse_bladder_cell_top2000.h5",
             "baron_mouse_pancreas": "baron_mouse_pancreas.h5"}
    for ds, f in bench.items():
        if not os.path.exists(os.path.join(data_dir, f)):
            print(f"rehash: {f} is not in {data_dir}: its fingerprints are left out", flush=True)
            continue
        for s in SCRIPTS:
            if s == "centralized.py":
                runs += [(f"{ds}-{b}", s, ["--data", ds, "--baseline", b] + (["--epochs", "2"] if b == "csc" else []))
                         for b in ("pca", "pca_raw", "csc")]
            elif s == "fedpca.py":
                runs.append((f"{ds}-fedpca", s, ["--data", ds]))
            else:
                runs.append((f"{ds}-{s[:-3]}-tuned", s, ["--data", ds, "--recipe", "tuned", "--rounds", "2"]))
        runs.append((f"{ds}-fedsc-paper", "fedsc.py", ["--data", ds] + SHORT))
        runs.append((f"{ds}-fedsc-fedprep", "fedsc.py", ["--data", ds, "--recipe", "tuned", "--rounds", "2",
                                                         "--preprocess", "federated", "--evaluate", "both"]))
    return runs


def make_inputs(folder):
    """Synthetic labelled counts (with gene and cell names) and two site files, written with
    today's code; both trees read the same files."""
    sys.path.insert(0, ROOT)
    import data as D
    import formats
    X, y = D.synthetic_counts(n_cells=240, n_genes=120, n_types=4, seed=3)
    genes = [f"g{j}" for j in range(X.shape[1])]
    cells = [f"c{i}" for i in range(len(X))]
    names = dict(gene_names=genes, cell_names=cells)
    paths = {"syn": formats.write_h5(os.path.join(folder, "syn.h5"), X, Y=y, **names)}
    for k, idx in enumerate((slice(0, 120), slice(120, 240))):
        paths[f"site{k}"] = formats.write_h5(os.path.join(folder, f"site{k}.h5"), X[idx], Y=y[idx], gene_names=genes,
                                       cell_names=cells[idx])
    return paths


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fingerprint(tree, runs, inputs, work, jobs=2):
    """Run the suite with the scripts of `tree`; {run name: {exit, row values, file hashes}}."""
    import pandas as pd
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")

    def one(run):
        name, script, argv = run
        out = os.path.join(work, name)
        os.makedirs(out)
        argv = [a.format(**inputs) for a in argv] + ["--seed", "0", "--out", os.path.join(out, "results.csv")]
        if "--threads" not in argv:
            argv += ["--threads", "1"]
        p = subprocess.run([sys.executable, os.path.join(tree, script)] + argv, cwd=tree, env=env,
                           capture_output=True, text=True)
        got = {"exit": p.returncode, "error": p.stderr.strip().splitlines()[-1:] if p.returncode else []}
        table = os.path.join(out, "results.csv")
        if os.path.exists(table):
            row = pd.read_csv(table, dtype=str, keep_default_na=False).iloc[-1].to_dict()
            got["row"] = {k: v for k, v in row.items() if k not in VOLATILE}
            folder = os.path.join(out, "runs", row["run"])
            got["files"] = {f: _sha(os.path.join(folder, f)) for f in FILES if os.path.exists(os.path.join(folder, f))}
        return name, got

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, runs))


def cached_fingerprint(commit, tree, runs, inputs, work, jobs):
    """fingerprint() of a tree's code, kept in results/logs/rehash/, keyed by the scripts' code hashes,
    the torch version, the suite's runs (names and arguments) and inputs: a second re-stamp against the
    same code reruns nothing."""
    import torch
    import runs as R
    code = {s: R.code_hash(os.path.join(tree, s)) for s in SCRIPTS if os.path.exists(os.path.join(tree, s))}
    key = hashlib.sha256(json.dumps([code, torch.__version__, sorted(map(list, runs)),
                                     {k: _sha(v) for k, v in sorted(inputs.items())},
                                     os.environ.get("FEDSC_DATA_DIR", "./data")]).encode()).hexdigest()[:16]
    path = os.path.join(ROOT, "results", "logs", "rehash", f"{commit}-{key}.json")
    if os.path.exists(path):
        print(f"rehash: the fingerprints of {commit} are cached ({os.path.relpath(path, ROOT)})", flush=True)
        return normal(json.load(open(path)))
    got = normal(fingerprint(tree, runs, inputs, work, jobs))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    json.dump(got, open(path, "w"), indent=1)
    return got


def normal(got):
    """The suite's input files live in a fresh temporary folder each time: rows name them by role."""
    import re
    for fp in got.values():
        fp["row"] = {k: re.sub(r"/[^'\",\[\] ]*/rehash-[A-Za-z0-9_]+", "{inputs}", v) if isinstance(v, str) else v
                     for k, v in fp.get("row", {}).items()}
    return got


def differences(old, new):
    """What moved, per run: exit code, a file's bytes, a row value (values both rows have)."""
    moved = {}
    for name in old:
        a, b = old[name], new.get(name, {})
        what = [k for k in ("exit", "error") if a.get(k) != b.get(k)]
        what += sorted(f for f in set(a.get("files", {})) | set(b.get("files", {}))
                       if a.get("files", {}).get(f) != b.get("files", {}).get(f))
        ra, rb = a.get("row", {}), b.get("row", {})
        what += sorted(k for k in set(ra) & set(rb) if ra[k] != rb[k])
        if what:
            moved[name] = what
    return moved


def git(*a, cwd=ROOT):
    return subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True)


def main(argv=None):
    import cli  # its Parser: an argument error is one `error:` line
    import common  # noqa: F401 (puts back the Ctrl-C handlers that importing cli replaces)
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD~1", help="the commit whose code the rows to re-stamp carry (default: the one before HEAD)")
    p.add_argument("--suite", choices=("full", "quick"), default="full")
    p.add_argument("--results", default=os.path.join(ROOT, "results"))
    p.add_argument("--dry-run", action="store_true", help="verify and report, change no row")
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import pandas as pd
    import formats
    import runs as R
    if git("status", "--porcelain", "--untracked-files=no", "--", "*.py").stdout.strip():
        sys.exit("error: commit today's code first: the re-stamped rows name the commit whose code they match")
    head, base = (git("rev-parse", "--short", r).stdout.strip() for r in ("HEAD", a.base))
    if not base:
        sys.exit(f"error: --base {a.base} is not a commit")
    today = {s: R.code_hash(os.path.join(ROOT, s)) for s in SCRIPTS}
    tmp = tempfile.mkdtemp(prefix="rehash-")
    tree = os.path.join(tmp, "base")
    try:
        if git("worktree", "add", "--detach", tree, base).returncode:
            sys.exit(f"error: cannot check out {base}")
        then = {s: R.code_hash(os.path.join(tree, s)) for s in SCRIPTS if os.path.exists(os.path.join(tree, s))}
        csvs = sorted(os.path.join(a.results, f) for f in os.listdir(a.results) if f.endswith(".csv"))
        frames = {f: pd.read_csv(f, dtype=str, keep_default_na=False) for f in csvs}
        held = {c for df in frames.values() if "code" in df for c in df["code"]}
        scripts = sorted(s for s in then if then[s] != today[s] and then[s] in held)
        if not scripts:
            print(f"rehash: no row carries code of {base} that differs from today's; nothing to do")
            return 0
        runs_ = [r for r in suite(a.suite, os.environ.get("FEDSC_DATA_DIR", "./data")) if r[1] in scripts]
        inputs = make_inputs(tmp)
        print(f"rehash: {len(runs_)} fingerprint runs of {', '.join(scripts)}, under {base} and under {head}", flush=True)
        old = cached_fingerprint(base, tree, runs_, inputs, os.path.join(tmp, "old"), a.jobs)
        new = cached_fingerprint(head, ROOT, runs_, inputs, os.path.join(tmp, "new"), a.jobs)
        moved = differences(old, new)
        print(f"rehash: {len(runs_) - len(moved)} of {len(runs_)} fingerprints bit-identical", flush=True)
        refused = sorted({s for n, _ in moved.items() for r in runs_ if r[0] == n for s in [r[1]]}
                         | {s for s in scripts if not any(r[1] == s for r in runs_)})  # no fingerprint: no re-stamp
        for n, what in sorted(moved.items()):
            print(f"rehash: fingerprint {n} moved: {', '.join(what)}", flush=True)
        total = 0
        for f, df in frames.items():
            changed, added = 0, set()  # options new since the rows were made: columns this file lacks
            for script in scripts:
                hit = (df["code"] == then[script]) if "code" in df else None
                if script in refused or hit is None or not hit.any():
                    continue
                mod = __import__(script[:-3])
                for field in mod.Args.__dataclass_fields__.values():
                    new = field.name not in df.columns or field.name in added or df.loc[hit, field.name].isna().all()
                    if field.init and new:  # a new option (no column, or none for these rows): its default
                        default = field.default_factory() if callable(field.default_factory) else field.default
                        if field.name not in df.columns:
                            df[field.name] = ""
                            added.add(field.name)
                        df.loc[hit, field.name] = str(default)
                for col in ("rehash_verified", "code_commit"):
                    if col not in df:
                        df[col] = ""
                df.loc[hit, "rehash_verified"] = base
                df.loc[hit, "code_commit"] = head
                df.loc[hit, "code"] = today[script]
                changed += int(hit.sum())
            if changed and not a.dry_run:
                formats.write_atomic(f, lambda t, df=df: df.to_csv(t, index=False))
            if changed:
                print(f"rehash: {os.path.relpath(f, ROOT)}: {changed} rows {'would be ' if a.dry_run else ''}re-stamped",
                      flush=True)
            total += changed
        print(f"rehash: {total} rows {'would be ' if a.dry_run else ''}re-stamped from {base} to {head}"
              + (f"; refused for {', '.join(refused)}: its rows keep their code hash" if refused else ""), flush=True)
        return 1 if refused else 0
    finally:
        git("worktree", "remove", "--force", tree)
        shutil.rmtree(tmp, ignore_errors=True)
        git("worktree", "prune")


if __name__ == "__main__":
    sys.exit(main())
