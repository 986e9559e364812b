"""The smoke test: each method file, centralized.py (its three baselines) and split.py run one short
round end to end as a subprocess on a tiny synthetic file, and their final line and row are checked.
Every other test is in tests/ (python -m pytest -q runs both).
Run: python -m pytest -q test_smoke.py"""
import concurrent.futures
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

import common
import runs
import data as D
from helpers import ROOT, TINY, rows, run, synth_h5, write_h5

SCRIPTS = [("fedsc.py", []), ("fedbyol.py", []), ("fedsimclr.py", []), ("fedmoco.py", ["--version", "1"]),
           ("fedmoco.py", ["--version", "2"]), ("fedsimsiam.py", [])]


BASELINES = [("pca", 50), ("pca_raw", 2), ("csc", common.EMBED_DIM)]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synth_h5(tmp_path_factory)


@pytest.fixture(scope="module")
def launched(synth, tmp_path_factory):
    """Every script's run, started at once on every core (each is one process, one torch thread):
    {key: (completed process, its output folder)}."""
    todo = {(s, tuple(e)): [s, "--data", synth, "--clients", "2"] + TINY + e for s, e in SCRIPTS}
    todo |= {("centralized.py", b): ["centralized.py", "--data", synth, "--baseline", b, "--n-genes", "100"]
             + (["--epochs", "2"] if b == "csc" else []) for b, _ in BASELINES}
    todo[("fedpca.py", ())] = ["fedpca.py", "--data", synth, "--clients", "2", "--n-genes", "100"]
    folders = {k: tmp_path_factory.mktemp("run") for k in todo}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(cores) as pool:
        done = {k: pool.submit(run, argv + ["--out", str(folders[k] / "r.csv")]) for k, argv in todo.items()}
    return {k: (f.result(), folders[k]) for k, f in done.items()}


@pytest.mark.parametrize("script,extra", SCRIPTS, ids=[s + "".join(e) for s, e in SCRIPTS])
def test_script_end_to_end_synthetic(script, extra, launched):
    p, tmp_path = launched[(script, tuple(extra))]
    out = str(tmp_path / "r.csv")
    assert p.returncode == 0, p.stderr
    assert "round 2/2" in p.stdout and "final" in p.stdout
    r = rows(out)
    assert len(r) == 1 and r["rounds"][0] == 2 and r["status"][0] == "ok"
    assert r["method"][0] == {"fedsc.py": "FedSC", "fedbyol.py": "FedBYOL", "fedsimclr.py": "FedSimCLR",
                              "fedsimsiam.py": "FedSimSiam"}.get(script, f"FedMoCoV{extra[-1] if extra else 1}")
    run_dir = os.path.join(tmp_path, "runs", r["run"][0])
    assert " " not in r["run"][0]
    assert np.load(os.path.join(run_dir, "embedding.npy")).shape == (300, common.EMBED_DIM)
    cl = pd.read_csv(os.path.join(run_dir, "clusters.csv"))
    assert len(cl) == 300 and list(cl["cell"]) == list(range(300))
    # the row's ARI is the one of the clusters it saved, against the input's labels
    assert r["ari"][0] == pytest.approx(100 * adjusted_rand_score(cl["label"], cl["cluster"]))
    assert sorted(set(cl["label_name"].astype(str))) == ["1", "2", "3", "4"]
    log = pd.read_csv(os.path.join(run_dir, "rounds.csv"))
    assert len(log) == 2 * 2 and set(log["client"]) == {0, 1} and np.isfinite(log["loss"]).all()
    assert r["code"][0] == runs.code_hash(os.path.join(ROOT, script))


@pytest.mark.parametrize("baseline,dim", BASELINES)
def test_centralized_baselines(baseline, dim, synth, launched):
    from sklearn.decomposition import PCA
    p, tmp_path = launched[("centralized.py", baseline)]
    out = str(tmp_path / "r.csv")
    assert p.returncode == 0, p.stderr
    r = rows(out)
    assert r["method"][0] == {"pca": "PCA", "pca_raw": "PCA-raw (paper)", "csc": "contrastive-sc"}[baseline]
    h = np.load(os.path.join(tmp_path, "runs", r["run"][0], "embedding.npy"))
    assert h.shape == (300, dim) and "rounds" not in r and "clients" not in r
    if baseline != "csc":  # the same embedding computed here, from the baseline's definition
        X, y, _, _ = D.read_counts(synth)
        Xin = D.preprocess(X, 100)[0] if baseline == "pca" else np.ceil(X.astype(np.float64))
        ref = PCA(dim, random_state=0).fit_transform(Xin)
        assert np.allclose(np.abs(h), np.abs(ref), atol=1e-4)


def test_fedpca_end_to_end(launched):
    p, tmp_path = launched[("fedpca.py", ())]
    assert p.returncode == 0, p.stderr
    r = rows(str(tmp_path / "r.csv"))
    assert "final" in p.stdout and r["method"][0] == "FedPCA" and r["status"][0] == "ok"
    h = np.load(os.path.join(tmp_path, "runs", r["run"][0], "embedding.npy"))
    assert h.shape == (300, 50) and 0 <= r["ari"][0] <= 100


def test_split_by_batch_then_run_the_sites(tmp_path):
    X, y = D.synthetic_counts(n_cells=120, n_genes=50, n_types=3, seed=12)
    batch = np.where(np.arange(120) < 50, "mouse1", "mouse2")
    path = write_h5(tmp_path / "two.h5", X, y, batch=batch.astype("S"),
                    gene_names=np.array([f"G{i}" for i in range(50)]).astype("S"))
    p = run(["split.py", path, "--by", "batch", "--out", str(tmp_path / "sites")])
    assert p.returncode == 0, p.stderr
    files = sorted(os.listdir(tmp_path / "sites"))
    assert files == ["two_mouse1.h5", "two_mouse2.h5"]
    X1, y1, _, _ = D.read_counts(str(tmp_path / "sites" / files[0]))
    assert np.array_equal(X1, X[:50]) and np.array_equal(y1, y[:50])
    out = str(tmp_path / "r.csv")
    p = run(["fedsimclr.py", "--sites"] + [str(tmp_path / "sites" / f) for f in files] + ["--out", out] + TINY)
    assert p.returncode == 0, p.stderr
    assert "genes: 50 shared by all sites" in p.stdout
    p = run(["split.py", path, "--by", "donor"])
    assert p.returncode == 2 and "no dataset 'donor'" in p.stderr
