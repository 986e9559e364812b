"""Data: the benchmark files and their download, the readers (HDF5, .h5ad, 10x, CSV, one file per
site), preprocessing (HVGs against a pandas reference, scaling) and the partition into clients.
Real-data tests read $FEDSC_DATA_DIR, default ./data."""
import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cli
import common
import federated
import data as D
from helpers import BLADDER, REAL, ROOT, TINY, parse, rows, run, site_files, write_h5


# ---------------------------------------------------------------------------------------------
# Benchmark files; the download path (no network in tests: a closed local port, and file:// URLs)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists(BLADDER), reason="real bladder file not available")
def test_fedsc_on_real_bladder(tmp_path):
    out = str(tmp_path / "r.csv")
    p = run(["fedsc.py", "--data", "mouse_bladder", "--rounds", "2", "--local-epochs", "1", "--out", out],
            env={"FEDSC_DATA_DIR": REAL})
    assert p.returncode == 0, p.stderr
    assert "2746 cells x 1500 genes, 16 types" in p.stdout
    r = rows(out)
    assert r["ari"][0] > 1 and r["types_per_client"][0] == 4 and r["n_genes"][0] == 1500
    assert "mu 0.700/0.700/0.700/0.700" in p.stdout  # round 2 is every client's first EMA: mu = alpha


@pytest.mark.skipif(not os.path.exists(BLADDER), reason="real bladder file not available")
def test_benchmark_file_by_path_gets_the_benchmarks_defaults(tmp_path):
    args = parse("fedsc", ["--data", BLADDER, "--out", str(tmp_path / "r.csv")])
    cli.resolve(args, os.path.join(ROOT, "fedsc.py"))
    assert args.n_genes == 1500 and args.types_per_client == 4


def test_download_failure_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSC_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(D, "SCDCC", "http://127.0.0.1:9/")
    with pytest.raises(D.DataError, match=f"put the file at {tmp_path}"):
        D.resolve_data("10X_PBMC")
    assert os.listdir(tmp_path) == []  # nothing half-written
    with pytest.raises(D.DataError, match="not downloadable"):
        D.resolve_data("baron_mouse_pancreas")
    monkeypatch.setenv("FEDSC_DATA_DIR", str(tmp_path / "new" / "data"))  # folders made for it are removed again
    with pytest.raises(D.DataError, match="could not download"):
        D.resolve_data("10X_PBMC")
    assert os.listdir(tmp_path) == []
    (tmp_path / "afile").write_text("x")
    for where in ("afile", "afile/sub"):  # a file, not a folder (or above it): one error line, before any download
        monkeypatch.setenv("FEDSC_DATA_DIR", str(tmp_path / where))
        for name in ("10X_PBMC", "baron_mouse_pancreas"):
            with pytest.raises(D.DataError, match="afile' is a file, not a folder"):
                D.resolve_data(name)


@pytest.mark.skipif(not os.path.exists(BLADDER), reason="real bladder file not available")
def test_download_verifies_checksum_and_writes_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSC_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(D, "SCDCC", "file://" + os.path.abspath(REAL) + "/")
    path = D.resolve_data("mouse_bladder")
    assert D.sha256sum(path) == D.BENCHMARKS["mouse_bladder"]["sha256"]
    bad = str(tmp_path / "bad.h5")
    with pytest.raises(D.DataError, match="sha256"):
        D.download("file://" + os.path.abspath(BLADDER), bad, "0" * 64)
    assert sorted(os.listdir(tmp_path)) == ["mouse_bladder_cell_top2000.h5"]


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def _h5ad(path, X, layers=None, raw=None, obs=None):
    def put(group, name, M):
        if sp.issparse(M):
            g = group.create_group(name)
            g.attrs["encoding-type"], g.attrs["shape"] = "csr_matrix", M.shape
            g["data"], g["indices"], g["indptr"] = M.data, M.indices, M.indptr
        else:
            group[name] = M
    with h5py.File(path, "w") as f:
        put(f, "X", X)
        for k, v in (layers or {}).items():
            put(f.require_group("layers"), k, v)
        if raw is not None:
            put(f.create_group("raw"), "X", raw)
        o = f.create_group("obs")
        for k, v in (obs or {}).items():
            o[k] = v
    return str(path)


def test_h5ad_reader_dense_and_csr_with_categorical_obs(tmp_path):
    X, y = D.synthetic_counts(n_cells=60, n_genes=30, seed=2)
    names = np.array(["B", "NK", "T", "mono"])
    for layout in ("dense", "csr"):
        path = _h5ad(tmp_path / f"{layout}.h5ad", X if layout == "dense" else sp.csr_matrix(X),
                     obs={"plain": names[y].astype("S")})
        with h5py.File(path, "a") as f:
            f["obs"].create_group("cell_type")
            f["obs"]["cell_type"]["codes"] = y.astype(np.int8)
            f["obs"]["cell_type"]["categories"] = names.astype("S")
        Xr, yr, label_names, used = D.read_counts(path, label_key="cell_type")
        Xr = Xr.toarray() if sp.issparse(Xr) else Xr
        assert np.array_equal(Xr, X) and np.array_equal(yr, y) and list(label_names) == list(names)
        assert used == "X" and np.array_equal(D.read_counts(path, label_key="plain")[1], y)
        with pytest.raises(D.DataError, match="no column 'donor'"):
            D.read_counts(path, label_key="donor")


def test_h5ad_layer_and_raw_hold_the_counts(tmp_path):
    X, y = D.synthetic_counts(n_cells=40, n_genes=20, seed=4)
    lib = X.sum(1, keepdims=True)
    norm = np.log1p(X / lib * 1e4).astype(np.float32)
    path = _h5ad(tmp_path / "n.h5ad", norm, layers={"counts": sp.csr_matrix(X)}, raw=X)
    with pytest.raises(D.DataError, match="not integers.*--layer"):
        D.read_counts(path)
    for layer, used in (("counts", "layers/counts"), ("raw", "raw/X")):
        Xr, _, _, what = D.read_counts(path, layer=layer)
        assert what.startswith(used) and np.array_equal(Xr.toarray() if sp.issparse(Xr) else Xr, X)
    with pytest.raises(D.DataError, match="no layers/spliced; layers are: counts"):
        D.read_counts(path, layer="spliced")


def test_h5_transpose_and_label_names(tmp_path):
    X, y = D.synthetic_counts(n_cells=30, n_genes=20, seed=5)
    names = np.array(["alpha", "beta", "delta", "gamma"])
    path = write_h5(tmp_path / "t.h5", X.T, y, label_names=names.astype("S"))
    Xr, yr, ln, _ = D.read_counts(path, transpose=True)
    assert np.array_equal(Xr, X) and list(ln) == list(names[np.unique(y)]) and np.array_equal(ln[yr], names[y])


def _write_10x(tmp, X, with_antibody=True):
    """X (cells x genes) as Cell Ranger writes it: an HDF5 (v3) and a gzipped mtx folder, genes x
    cells, plus one antibody-capture feature that is not a gene."""
    import gzip
    import scipy.io
    genes = np.array([f"Gene{i}" for i in range(X.shape[1])] + (["CD3_TotalSeqB"] if with_antibody else []))
    types = np.array(["Gene Expression"] * X.shape[1] + (["Antibody Capture"] if with_antibody else []))
    full = np.hstack([X, np.full((len(X), 1), 7.0)]) if with_antibody else X
    barcodes = np.array([f"AAACCTGAG{i:07d}-1" for i in range(len(X))])
    m = sp.csc_matrix(full.T.astype(np.int32))
    with h5py.File(tmp / "filtered_feature_bc_matrix.h5", "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"], g["shape"] = m.data, m.indices, m.indptr, np.array(m.shape)
        g["barcodes"] = barcodes.astype("S")
        feats = g.create_group("features")
        feats["id"], feats["name"], feats["feature_type"] = genes.astype("S"), genes.astype("S"), types.astype("S")
    folder = tmp / "filtered_feature_bc_matrix"
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(full.T.astype(np.int32)))
    with gzip.open(folder / "features.tsv.gz", "wt") as f:
        f.writelines(f"ENSG{i:011d}\t{g}\t{t}\n" for i, (g, t) in enumerate(zip(genes, types)))
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as f:
        f.writelines(b + "\n" for b in barcodes)
    return str(tmp / "filtered_feature_bc_matrix.h5"), str(folder), barcodes


def test_10x_h5_and_mtx_folder_readers(tmp_path):
    X, y = D.synthetic_counts(n_cells=40, n_genes=25, seed=9)
    h5, folder, barcodes = _write_10x(tmp_path, X)
    for path in (h5, folder):
        names = {}
        Xr, yr, _, used = D.read_counts(path, names=names)
        assert np.array_equal(Xr.toarray(), X) and yr is None and "10x" in used  # the antibody row is dropped
        assert list(names["genes"]) == [f"Gene{i}" for i in range(25)] and list(names["barcodes"]) == list(barcodes)
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="not a 10x matrix folder"):
        D.read_counts(str(tmp_path / "empty"))


def test_a_10x_folder_end_to_end_keeps_barcodes(tmp_path):
    X, y = D.synthetic_counts(n_cells=120, n_genes=80, seed=10)
    _, folder, barcodes = _write_10x(tmp_path, X, with_antibody=False)
    (tmp_path / "labels.txt").write_text("\n".join(str(v) for v in y))
    out = str(tmp_path / "r.csv")
    p = run(["fedsc.py", "--data", folder, "--labels", str(tmp_path / "labels.txt"), "--clients", "2",
             "--out", out] + TINY)
    assert p.returncode == 0, p.stderr
    cl = pd.read_csv(os.path.join(tmp_path, "runs", rows(out)["run"][0], "clusters.csv"))
    assert list(cl["barcode"]) == list(barcodes[cl["cell"]])


def test_csv_reader_with_labels_file(tmp_path):
    X, y = D.synthetic_counts(n_cells=40, n_genes=20, seed=3)
    pd.DataFrame(X).to_csv(tmp_path / "c.csv")  # a row-number index column, as pandas writes
    pd.Series(np.array(["a", "b", "c", "d"])[y], name="label").to_csv(tmp_path / "l.csv", index=False)
    Xr, yr, names, _ = D.read_counts(str(tmp_path / "c.csv"), labels=str(tmp_path / "l.csv"))
    assert np.allclose(Xr, X) and np.array_equal(yr, np.unique(y, return_inverse=True)[1])
    assert list(names) == ["a", "b", "c", "d"][: len(np.unique(y))]


def test_unlabelled_genes_by_cells_csv(tmp_path):
    X, _ = D.synthetic_counts(n_cells=200, n_genes=150, seed=1)
    path = tmp_path / "counts.csv"
    pd.DataFrame(X.T, index=[f"g{i}" for i in range(150)],
                 columns=[f"cell{i}" for i in range(200)]).to_csv(path)  # genes x cells, as R writes
    out = str(tmp_path / "r.csv")
    p = run(["fedsc.py", "--data", str(path), "--transpose", "--partition", "iid", "--n-clusters", "3",
             "--clients", "2", "--out", out] + TINY)
    assert p.returncode == 0, p.stderr
    r = rows(out)
    assert "ari" not in r.columns and np.isfinite(r["sil"][0]) and len(pd.read_csv(
        os.path.join(tmp_path, "runs", r["run"][0], "clusters.csv"))) == 200


def test_one_file_per_site(tmp_path):
    a, b, X, y = site_files(tmp_path)
    out = str(tmp_path / "r.csv")
    p = run(["fedsc.py", "--sites", a, b, "--out", out] + TINY)
    assert p.returncode == 0, p.stderr
    assert "genes: 60 shared by all sites; dropped per site: [0, 1]" in p.stdout
    r = rows(out)
    assert r["clients"][0] == 2 and r["run"][0].startswith("sites__")
    cl = pd.read_csv(os.path.join(tmp_path, "runs", r["run"][0], "clusters.csv"))
    assert list(cl["client"]) == [0] * 70 + [1] * 90 and list(cl["barcode"][:2]) == ["a0", "a1"]
    assert list(cl["label_name"]) == list(np.array(["B", "NK", "T", "mono"])[y])
    # each site's own cells come back as an .h5ad that anndata and plain h5py both read
    import anndata
    folder = os.path.join(tmp_path, "runs", r["run"][0])
    emb = np.load(os.path.join(folder, "embedding.npy"))
    for k, (n, first) in enumerate([(70, 0), (90, 70)]):
        ad = anndata.read_h5ad(os.path.join(folder, f"site{k}_{'ab'[k]}.h5ad"))
        assert ad.shape == (n, 60) and list(ad.obs_names[:1]) == [f"{'ab'[k]}0"] and ad.var_names[0].startswith("Gene")
        assert np.allclose(ad.obsm["X_fedsc"], emb[first:first + n]) and str(ad.obs["fedsc_cluster"].dtype) == "category"
        assert list(ad.obs["fedsc_cluster"].astype(int)) == list(cl["cluster"][first:first + n])
        assert json.loads(ad.uns["fedsc_config"])["sites"] == [a, b]
        with h5py.File(os.path.join(folder, f"site{k}_{'ab'[k]}.h5ad")) as f:
            assert f["obsm"]["X_fedsc"].shape == (n, 60) and f.attrs["encoding-type"] == "anndata"
    # the same cells in one file give the same preprocessed matrix: sites are matched by gene name
    args = parse("fedsc", ["--sites", a, b, "--n-genes", "100", "--out", out])
    cli.check_args(args)
    cli.resolve(args, os.path.join(ROOT, "fedsc.py"))
    assert np.allclose(federated.load_sites(args).X, D.preprocess(X, 100)[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Preprocessing, partition
# ---------------------------------------------------------------------------------------------
def hvg_direct(X_log, n_top):
    """scanpy's seurat flavour written with pandas, as scanpy does it (pd.cut + groupby)."""
    X = np.expm1(X_log)
    mean, var = X.mean(0), X.var(0, ddof=1)
    disp = np.log(var / mean)
    df = pd.DataFrame({"m": np.log1p(mean), "d": disp})
    df["bin"] = pd.cut(df["m"], bins=20)
    g = df.groupby("bin", observed=False)["d"]
    mu, sd = g.mean(), g.std(ddof=1)
    one = sd.isnull()
    sd[one], mu[one] = mu[one].values, 0
    z = (df["d"].values - mu[df["bin"]].values) / sd[df["bin"]].values
    cut = np.sort(z[~np.isnan(z)])[::-1][n_top - 1]
    return np.nan_to_num(z) >= cut


def test_hvg_matches_pandas_computation():
    X, _ = D.synthetic_counts(n_cells=300, n_genes=400, seed=5)
    X = X[:, X.sum(0) > 0]
    lib = X.sum(1, keepdims=True)
    X_log = np.log1p(X * np.median(lib) / lib)
    for n in (50, 100, 200):
        ours = D.hvg_seurat(X_log, n)
        assert np.array_equal(ours, hvg_direct(X_log, n))
        assert ours.sum() >= n


def test_preprocess_scales_each_gene():
    X, _ = D.synthetic_counts(n_cells=200, n_genes=150, seed=6)
    X[:, 0] = 0  # an empty gene is removed first
    Xp, cells, genes = D.preprocess(X, 60)
    assert Xp.dtype == np.float32 and 0 not in genes and Xp.shape == (200, len(genes))
    assert np.allclose(Xp.mean(0), 0, atol=1e-5) and np.allclose(Xp.std(0, ddof=1), 1, atol=1e-4)


def test_preprocess_sparse_equals_dense_and_a_direct_computation():
    X, _ = D.synthetic_counts(n_cells=150, n_genes=120, seed=7)
    X[3] = 0  # an empty cell is removed
    dense, cells, genes = D.preprocess(X, 40)
    sparse, cells2, genes2 = D.preprocess(sp.csr_matrix(X), 40)
    assert np.array_equal(cells, cells2) and np.array_equal(genes, genes2) and np.array_equal(dense, sparse)
    assert 3 not in cells
    # the same steps written out densely, gene selection from the pandas reference
    Xc = X[cells][:, X.sum(0) >= 1]
    lib = Xc.sum(1, keepdims=True)
    L = np.log1p(Xc * np.median(lib) / lib)
    sel = hvg_direct(L, 40)
    ref = (L[:, sel] - L[:, sel].mean(0)) / L[:, sel].std(0, ddof=1)
    assert np.allclose(dense, ref, atol=1e-5)


def test_partition_class_heap():
    sizes = [1292, 702, 606, 459, 450, 332, 295, 135]  # PBMC
    y = np.repeat(np.arange(8), sizes)
    parts = D.partition(y, 4, "class", 2, seed=0)
    for k, p in enumerate(parts):
        assert sorted(set(y[p])) == [2 * k, 2 * k + 1] and len(p) == sizes[2 * k] + sizes[2 * k + 1]
    allp = np.concatenate(parts)
    assert len(allp) == len(np.unique(allp)) == len(y)
    yb = np.repeat(np.arange(16), [717, 357, 344, 316, 236, 224, 131, 80, 75, 64, 44, 38, 41, 36, 30, 13])
    c1 = D.partition(yb, 4, "class", 1, seed=0)  # types 4..15 are used by no client
    assert [sorted(set(yb[p])) for p in c1] == [[0], [1], [2], [3]]
    c8 = D.partition(yb, 4, "class", 8, seed=0)  # each type halved; clients 0/2 and 1/3 share types
    assert [sorted(set(yb[p])) for p in c8] == [list(range(8)), list(range(8, 16))] * 2
    assert len(np.intersect1d(c8[0], c8[2])) == 0 and len(np.concatenate(c8)) == len(yb)
    assert abs(len(c8[0]) - len(c8[2])) <= 8
    c4 = D.partition(yb, 4, "class", 4, seed=0)
    assert [len(p) for p in c4] == [1734, 671, 221, 120]  # label order, not sorted size order
    again, other = D.partition(yb, 4, "class", 8, seed=0), D.partition(yb, 4, "class", 8, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(c8, again))
    assert not all(np.array_equal(a, b) for a, b in zip(c8, other))


def test_partition_iid_and_dirichlet():
    y = np.repeat(np.arange(5), 100)
    iid = D.partition(y, 3, "iid", seed=0)
    assert sorted(len(p) for p in iid) == [166, 167, 167] and len(np.unique(np.concatenate(iid))) == 500
    dr = D.partition(y, 4, "dirichlet", alpha=0.3, seed=0)
    assert len(np.unique(np.concatenate(dr))) == sum(len(p) for p in dr) == 500
    assert min(len(p) for p in dr) >= 10
    assert all(np.array_equal(a, b) for a, b in zip(dr, D.partition(y, 4, "dirichlet", alpha=0.3, seed=0)))
