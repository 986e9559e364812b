"""What the test files share: the repository root (every script runs with it as its working
directory), a subprocess runner, tiny input files (the synthetic dataset, two site files), results
rows and argument parsing. test_smoke.py and tests/*.py import it as `helpers`: pytest.ini puts the
repository root (the modules under test) and tests/ on sys.path."""
import importlib
import os
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import torch

import common
import runs
import data as D

torch.set_num_threads(1)  # as every script does: this small MLP is slower on two threads
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, not tests/
REAL = os.environ.get("FEDSC_DATA_DIR", os.path.join(ROOT, "data"))
BLADDER = os.path.join(REAL, "mouse_bladder_cell_top2000.h5")
TINY = ["--rounds", "2", "--local-epochs", "1", "--batch-size", "64", "--n-genes", "100"]


def run(args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, env=e, timeout=600)


def write_h5(path, X, y=None, **extra):
    with h5py.File(path, "w") as f:
        f["X"] = X
        if y is not None:
            f["Y"] = y
        for k, v in extra.items():
            f[k] = v
    return str(path)


def synth_h5(tmp_path_factory):
    """The `synth` fixture's file: 300 cells, 200 genes, 4 types labelled 1..4."""
    X, y = D.synthetic_counts(n_cells=300, n_genes=200, n_types=4, seed=0)
    return write_h5(tmp_path_factory.mktemp("data") / "synth.h5", X, y + 1)


def rows(csv):
    return pd.read_csv(csv, float_precision="round_trip", dtype=runs.TEXT_COLUMNS) if os.path.exists(csv) else pd.DataFrame()


def parse(name, argv=()):
    return common.parse_args(importlib.import_module(name).Args, list(argv))


def site_files(tmp):
    """Two sites of one synthetic dataset, as two labs would have them: gene names in another order
    and one gene only the second site measured; labels and barcodes."""
    X, y = D.synthetic_counts(n_cells=160, n_genes=60, n_types=4, seed=11)
    genes = np.array([f"Gene{i}" for i in range(60)])
    names = np.array(["B", "NK", "T", "mono"])
    a = write_h5(tmp / "a.h5", X[:70], names[y[:70]].astype("S"), gene_names=genes.astype("S"),
                 cell_names=np.array([f"a{i}" for i in range(70)]).astype("S"))
    order = np.random.default_rng(0).permutation(60)
    Xb = np.hstack([X[70:, order], np.ones((90, 1))])
    b = write_h5(tmp / "b.h5", Xb, names[y[70:]].astype("S"), gene_names=np.append(genes[order], "Extra1").astype("S"),
                 cell_names=np.array([f"b{i}" for i in range(90)]).astype("S"))
    return a, b, X, y
