"""fedpca.py: its embedding is the pooled PCA of the clients' cells up to each component's sign; with
every cell on a client it clusters as centralized.py --baseline pca; nothing with a row per cell
leaves a site; the script runs end to end (default, --sites, --evaluate federated)."""
import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import centralized  # noqa: E402
import common  # noqa: E402
import data as D  # noqa: E402
import fedpca  # noqa: E402
import formats  # noqa: E402

PBMC = os.path.join(os.environ.get("FEDSC_DATA_DIR", ""), "10X_PBMC_top2000.h5")


def synthetic(path, cells=slice(None), **names):
    """4 types whose programs overlap enough that KMeans does not find them all (ARI well below 100)."""
    X, y = D.synthetic_counts(n_cells=401, n_genes=300, seed=0, program_genes=10, dispersion=1.0)
    return formats.write_h5(str(path), X[cells], Y=y[cells], **names)


def run_setup(argv, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        args = common.parse_args(fedpca.Args, argv + ["--out", str(tmp_path / "r.csv")])
        return args, common.setup(args)


def signed_error(h, ref):
    """Per column, max |h - ref| after flipping ref's column to h's sign."""
    return np.abs(h - ref * np.sign((h * ref).sum(0))).max(0)


@pytest.mark.parametrize("dataset", ["synthetic", "pbmc"])
def test_embedding_is_pooled_pca_of_the_held_cells(dataset, tmp_path):
    if dataset == "pbmc" and not os.path.exists(PBMC):
        pytest.skip(f"{PBMC} not found")
    path = synthetic(tmp_path / "s.h5") if dataset == "synthetic" else "10X_PBMC"
    # 3 clients, one type each (synthetic) or two (PBMC): some types are on no client
    args, data = run_setup(["--data", path, "--clients", "3"] + (["--types-per-client", "1"] if dataset == "synthetic" else []), tmp_path)
    held = np.concatenate(data.parts)
    unheld = np.setdiff1d(np.arange(len(data.X)), held)
    assert len(unheld) > 0
    h = fedpca.federated_pca(args, data)
    ref = PCA(50, svd_solver="full").fit(data.X[held].astype(np.float64))
    tol = 1e-9 * np.abs(h).max()
    assert signed_error(h[held], ref.transform(data.X[held].astype(np.float64))).max() < tol
    assert signed_error(h[unheld], ref.transform(data.X[unheld].astype(np.float64))).max() < tol  # the same map
    _, components, _ = fedpca.server_pca([fedpca.site_sums(data.X[i]) for i in data.parts], 50)
    assert (components[np.abs(components).argmax(0), np.arange(50)] > 0).all()  # the sign rule


def test_every_cell_on_a_client_clusters_as_centralized_pca(tmp_path):
    """centralized.py's pca is sklearn's on data.X as it is, float32, so it computes in float32:
    it equals the exact PCA to float32 precision only (about 1e-5 of each component's scale). The
    same sklearn PCA on float64 equals fedpca to 1e-9. KMeans gets the same clusters from both."""
    args, data = run_setup(["--data", synthetic(tmp_path / "s.h5"), "--partition", "iid"], tmp_path)
    h = fedpca.federated_pca(args, data)
    scale = np.abs(h).max(0)
    assert (signed_error(h, centralized.pca(data.X.astype(np.float64), 50, args.seed)) < 1e-9 * scale).all()
    h32 = centralized.pca(data.X, 50, args.seed)  # exactly what centralized.py --baseline pca runs
    assert h32.dtype == np.float32 and (signed_error(h, h32) < 1e-4 * scale).all()
    (m, pred), (m32, pred32) = (common.cluster_metrics(e, data.y, data.n_clusters, args.seed) for e in (h, h32))
    assert (pred == pred32).all() and m["ari"] == m32["ari"] and 5 < m["ari"] < 95


def leaks(crossed, sizes):
    """The arrays among what crossed that have a dimension equal to a client's cell count."""
    flat = [x for item in crossed for x in (item if isinstance(item, tuple) else (item,))]
    return [np.shape(x) for x in flat if set(np.shape(x)) & set(sizes)]


def test_nothing_with_a_row_per_cell_crosses(tmp_path, monkeypatch):
    args, data = run_setup(["--data", synthetic(tmp_path / "s.h5"), "--partition", "iid"], tmp_path)
    sizes = (37, 101, 163)  # distinct, odd, neither the number of genes nor of components: 100 cells on no client
    assert not set(sizes) & {data.X.shape[1], args.n_components}
    data.parts = list(np.split(np.random.RandomState(0).permutation(len(data.X))[:sum(sizes)], np.cumsum(sizes)[:-1]))
    crossed, site_sums, site_project = [], fedpca.site_sums, fedpca.site_project

    def spy(f, sent):  # f, recording sent(its arguments, its result): what crosses
        def wrapped(*a):
            out = f(*a)
            crossed.append(sent(a, out))
            return out
        return wrapped

    monkeypatch.setattr(fedpca, "site_sums", spy(site_sums, lambda a, out: out))  # SITE -> SERVER: all it returns
    monkeypatch.setattr(fedpca, "site_project", spy(site_project, lambda a, out: a[1:]))  # SERVER -> SITE: all but its cells
    fedpca.federated_pca(args, data)
    assert len(crossed) == 2 * len(sizes) + 1 and leaks(crossed, sizes) == []
    # the check bites: a site that also sends its cells is caught
    crossed.clear()
    monkeypatch.setattr(fedpca, "site_sums", spy(lambda x: site_sums(x) + (x,), lambda a, out: out))
    fedpca.federated_pca(args, data)
    assert sorted(leaks(crossed, sizes)) == [(n, data.X.shape[1]) for n in sizes]


def run(script, *argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=cwd, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert any(line.startswith("final ") for line in p.stdout.splitlines()), p.stdout
    return p.stdout


def test_end_to_end_default_and_sites(tmp_path):
    syn = synthetic(tmp_path / "s.h5")
    out = run("fedpca.py", "--data", syn, "--out", "tmp/r.csv", cwd=tmp_path)
    assert "belong to no client" not in out  # 4 types on 4 clients: every cell is on a client
    run("centralized.py", "--baseline", "pca", "--data", syn, "--out", "tmp/c.csv", cwd=tmp_path)
    fed, cen = pd.read_csv(tmp_path / "tmp/r.csv").iloc[0], pd.read_csv(tmp_path / "tmp/c.csv").iloc[0]
    assert fed["method"] == "FedPCA" and fed["status"] == "ok" and fed["ari"] == cen["ari"] and fed["nmi"] == cen["nmi"]

    genes = np.array([f"g{i}" for i in range(300)])
    a = synthetic(tmp_path / "a.h5", slice(0, 151), gene_names=genes)
    b = synthetic(tmp_path / "b.h5", slice(151, None), gene_names=genes)
    run("fedpca.py", "--sites", a, b, "--evaluate", "federated", "--out", "tmp/r.csv", cwd=tmp_path)
    row = pd.read_csv(tmp_path / "tmp/r.csv").iloc[1]
    assert row["method"] == "FedPCA" and row["evaluate"] == "federated" and np.isfinite(row["ari"])
    assert len(list((tmp_path / "tmp/runs").glob("sites__FedPCA__*/site*.h5ad"))) == 2
