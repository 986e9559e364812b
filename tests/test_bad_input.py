"""Bad input: one `error:` line, exit 2, no traceback, no row, before any training (bad files,
arguments and site files); a diverged run; Ctrl-C on the benchmark stops it and its runs."""
import importlib
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest

import cli
import common
import data as D
from helpers import BLADDER, REAL, ROOT, TINY, parse, rows, run, site_files, write_h5


# ---------------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit 2, no traceback, no row, before any training
# ---------------------------------------------------------------------------------------------
def _bad_files(tmp):
    X, y = D.synthetic_counts(n_cells=50, n_genes=40, n_types=4, seed=0)
    f = {"neg": write_h5(tmp / "neg.h5", -X, y), "nan": write_h5(tmp / "nan.h5", np.where(X > 3, np.nan, X), y),
         "short": write_h5(tmp / "short.h5", X, y[:-5]), "ok": write_h5(tmp / "ok.h5", X, y),
         "tiny": write_h5(tmp / "tiny.h5", X[:3], np.array([0, 0, 1])), "lognorm": write_h5(tmp / "lognorm.h5", np.log1p(X), y)}
    with h5py.File(tmp / "nocounts.h5", "w") as h:
        h["Y"] = y
    f["nocounts"] = str(tmp / "nocounts.h5")
    (tmp / "junk.h5").write_text("not hdf5")
    f["junk"] = str(tmp / "junk.h5")
    pd.DataFrame(X).to_csv(tmp / "noheader.csv", header=False, index=False)
    f["noheader"] = str(tmp / "noheader.csv")
    pd.DataFrame(X.T, index=[f"ENSG{i:011d}" for i in range(40)], columns=[f"c{i}" for i in range(50)]).to_csv(tmp / "gxc.csv")
    f["gxc"] = str(tmp / "gxc.csv")
    pd.DataFrame(X, index=[f"c{i}" for i in range(50)], columns=[f"g{i}" for i in range(40)]).to_csv(tmp / "cxg.csv")
    (tmp / "labels40.txt").write_text("\n".join("ab"[i % 2] for i in range(40)))
    f["cxg"], f["labels40"] = str(tmp / "cxg.csv"), str(tmp / "labels40.txt")
    (tmp / "notresults.csv").write_text("a,b\n1,2\n")
    pd.DataFrame(X[:, 1:], index=X[:, 0], columns=[f"g{i}" for i in range(39)]).to_csv(tmp / "nonames.csv")
    f["nonames"] = str(tmp / "nonames.csv")
    f["notresults"] = str(tmp / "notresults.csv")
    (tmp / "labels_numbers.txt").write_text("\n".join(f"{v}.0" if i % 2 else str(v) for i, v in enumerate(y)))  # 0 and 0.0
    f["labels_numbers"] = str(tmp / "labels_numbers.txt")
    pd.DataFrame(X, index=[f"c{min(i, 48)}" for i in range(50)], columns=[f"g{i}" for i in range(40)]).to_csv(tmp / "dupcells.csv")
    pd.DataFrame({"cell": [f"c{i}" for i in range(49)], "label": y[:49]}).to_csv(tmp / "labels_by_name.csv", index=False)
    f["dupcells"], f["labels_by_name"] = str(tmp / "dupcells.csv"), str(tmp / "labels_by_name.csv")
    return f


BAD = [  # (case, script, arguments, part of the message)
    ("missing file", "fedsc", ["--data", "/nonexistent/file.h5"], "does not exist"),
    ("unknown name", "fedsc", ["--data", "PBMC_68k"], "unknown dataset name"),
    ("not hdf5 or table", "fedsc", ["--data", "{junk}"], "neither HDF5"),
    ("no counts", "fedsc", ["--data", "{nocounts}"], "holds no counts"),
    ("negative", "fedsc", ["--data", "{neg}"], "negative"),
    ("nan", "fedsc", ["--data", "{nan}"], "NaN"),
    ("log-normalised", "fedsc", ["--data", "{lognorm}"], "not integers"),
    ("label length", "fedsc", ["--data", "{short}"], "45 labels for 50 cells"),
    ("csv without header", "fedsc", ["--data", "{noheader}", "--n-clusters", "2"], "first line is numbers"),
    ("genes x cells without --transpose", "fedsc", ["--data", "{gxc}", "--n-clusters", "2"], "pass --transpose"),
    ("labels match the columns", "fedsc", ["--data", "{cxg}", "--labels", "{labels40}"], "probably genes x cells"),
    ("--layer on a plain h5", "fedsc", ["--data", "{ok}", "--layer", "counts"], "--layer is for .h5ad"),
    ("csv first column is data", "fedsc", ["--data", "{nonames}", "--n-clusters", "2"], "not increasing row numbers"),
    ("fewer cells than clients", "fedsc", ["--data", "{tiny}", "--clients", "8", "--partition", "iid"], "3 cells for 8 clients"),
    ("too many types", "fedsc", ["--data", "{ok}", "--types-per-client", "9"], "is more than the 4"),
    ("client with one cell", "fedsc", ["--data", "{tiny}", "--clients", "3", "--partition", "iid", "--n-genes", "10"],
     "every client needs at least 2"),
    ("batch size 1", "fedsc", ["--data", "{ok}", "--batch-size", "1"], "--batch-size must be at least 2"),
    ("negative n-genes", "fedsc", ["--data", "{ok}", "--n-genes", "-5"], "--n-genes must be positive"),
    ("n-clusters 1", "fedsc", ["--data", "{ok}", "--n-clusters", "1"], "--n-clusters must be at least 2"),
    ("n-clusters above cells", "fedsc", ["--data", "{ok}", "--n-clusters", "80"], "needs fewer clusters than the 50 cells"),
    ("negative seed", "fedsc", ["--data", "{ok}", "--seed", "-1"], "--seed must be in [0, 2^32)"),
    ("seed too large", "fedsc", ["--data", "{ok}", "--seed", str(2 ** 32)], "--seed must be in [0, 2^32)"),
    ("label key on a table", "fedsc", ["--data", "{cxg}", "--label-key", "cell_type"], "--label-key is for HDF5"),
    ("dirichlet alpha 0", "fedsc", ["--data", "{ok}", "--partition", "dirichlet", "--dirichlet-alpha", "0"],
     "--dirichlet-alpha must be positive"),
    ("queue size 0", "fedmoco", ["--data", "{ok}", "--queue-size", "0"], "--queue-size must be at least 1"),
    ("temperature 0", "fedsimclr", ["--data", "{ok}", "--temperature", "0"], "--temperature must be positive"),
    ("temperature negative (moco)", "fedmoco", ["--data", "{ok}", "--temperature", "-1"], "--temperature must be positive"),
    ("eval-every negative", "fedsc", ["--data", "{ok}", "--eval-every", "-1"], "--eval-every must be 0"),
    ("centralized threads 0", "centralized", ["--data", "{ok}", "--threads", "0"], "--threads must be at least 1"),
    ("centralized n-components 0", "centralized", ["--data", "{ok}", "--n-components", "0"], "--n-components must be at least 1"),
    ("out is a directory", "fedsc", ["--data", "{ok}", "--out", "{dir}"], "is a directory"),
    ("out is not a results csv", "fedsc", ["--data", "{ok}", "--out", "{notresults}"], "not a results CSV"),
    ("out not writable", "fedsc", ["--data", "{ok}", "--out", "/proc/fedsc/r.csv"], "cannot write"),
    ("out names no file", "fedsc", ["--data", "{ok}", "--out", ""], "names no file"),
    ("one number spelled two ways", "fedsc", ["--data", "{ok}", "--labels", "{labels_numbers}"], "spell one type '0' and '0.0'"),
    ("labels by name, two cells of one name", "fedsc", ["--data", "{dupcells}", "--labels", "{labels_by_name}"],
     "the data has two cells named 'c48'"),
]


def _setup_only(name, argv):
    """What a script does before training: parse, check, resolve, load, partition."""
    args = common.parse_args(importlib.import_module(name).Args, argv)
    if name == "centralized":
        cli.check_args(args)
        cli.resolve(args, os.path.join(ROOT, "centralized.py"))
        return common.load(args)
    return common.setup(args)


@pytest.mark.parametrize("case,name,argv,expect", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_refused_before_training(case, name, argv, expect, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSC_DATA_DIR", str(tmp_path))
    files = dict(_bad_files(tmp_path), dir=str(tmp_path))
    argv = [a.format(**files) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "r.csv")]
    with pytest.raises(D.DataError, match=re.escape(expect)):
        _setup_only(name, argv)


def test_bad_input_exit_code_contract(tmp_path):
    """One subprocess: exit 2, a single `error:` line, no traceback, no row, no run folder."""
    out = str(tmp_path / "r.csv")
    bad = write_h5(tmp_path / "lognorm.h5", np.log1p(D.synthetic_counts(50, 40, seed=0)[0]), np.arange(50) % 2)
    p = run(["fedsc.py", "--data", bad, "--out", out])
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1 and "not integers" in p.stderr
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "runs")


def test_n_genes_above_the_gene_count_says_what_is_used(capsys):
    X, _ = D.synthetic_counts(n_cells=60, n_genes=30, seed=0)
    assert D.preprocess(X, 500)[0].shape[1] == 30
    assert "using all of them" in capsys.readouterr().out


@pytest.mark.parametrize("case,expect", [("missing", "site 1 ('"), ("no shared genes", "share 0 gene name(s) of 60"),
                                         ("3 shared genes", "share 3 gene name(s) of 60"),
                                         ("duplicate barcodes", "duplicate cell barcodes"), ("no names", "no gene names")])
def test_bad_sites_are_refused_naming_the_site(case, expect, tmp_path):
    a, b, X, y = site_files(tmp_path)
    if case == "missing":
        b = str(tmp_path / "nowhere.h5")
    elif case.endswith("shared genes"):
        with h5py.File(b, "a") as f:
            shared = 3 if case.startswith("3") else 0
            names = [x.decode() for x in f["gene_names"][()]]
            del f["gene_names"]
            f["gene_names"] = np.array(names[:shared] + [f"Other{i}" for i in range(shared, 61)]).astype("S")
    elif case == "duplicate barcodes":
        with h5py.File(b, "a") as f:
            del f["cell_names"]
            f["cell_names"] = np.array(["b0"] * 90).astype("S")
    else:
        with h5py.File(b, "a") as f:
            del f["gene_names"]
    args = parse("fedsc", ["--sites", a, b, "--out", str(tmp_path / "r.csv")])
    with pytest.raises(D.DataError, match=re.escape(expect)):
        common.setup(args)


# ---------------------------------------------------------------------------------------------
# Runs that stop: divergence, Ctrl-C
# ---------------------------------------------------------------------------------------------
def test_diverged_run_says_so_and_records_it(synth, tmp_path):
    out = str(tmp_path / "r.csv")
    p = run(["fedsimclr.py", "--data", synth, "--clients", "2", "--out", out, "--lr", "1e30"] + TINY)
    assert p.returncode == 3 and p.stderr.startswith("diverged: ") and "Traceback" not in p.stderr
    r = rows(out)
    assert r["status"].tolist() == ["diverged"] and "ari" not in r


@pytest.mark.skipif(not os.path.exists(BLADDER), reason="real bladder file not available")
def test_ctrl_c_stops_the_benchmark_and_its_runs(tmp_path):
    res = str(tmp_path / "results")
    env = dict(os.environ, FEDSC_DATA_DIR=REAL, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "benchmark.py", "table3", "--quick", "--jobs", "2", "--results", res],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.isdir(os.path.join(res, "quick", "logs", "table3"))
                                          and len(os.listdir(os.path.join(res, "quick", "logs", "table3"))) == 2):
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 130 and "interrupted: 0 of 4 table3 runs finished" in out, out
    assert "2 stopped, 2 not started" in out
    left = subprocess.run(["pgrep", "-f", res], capture_output=True, text=True).stdout.split()
    assert left == [] and not os.path.exists(os.path.join(res, "quick", "table3.csv"))


def test_one_spelling_of_a_number_and_of_a_name():
    import formats
    same = [["0", "0.0"], ["1", "01"], ["7", " 7.00"], ["0", "-0"], ["1.0", "1_0"], ["T cell", "T_cell"], ["B", "b"]]
    apart = [["2.1", "2.10"], ["1", "10"], ["1.5", "15"], ["12345678901234567890", "12345678901234567891"],
             ["1e400", "2e400"], ["-1", "1"], ["T cell", "NK cell"]]
    assert all(formats.one_spelling([pair]) == sorted(pair) for pair in same)
    assert all(formats.one_spelling([pair]) is None for pair in apart)
    assert formats.one_spelling([["0", "1"], ["1.0"]]) == ["1", "1.0"]  # across sites too
