"""Data helpers shared by every method file: reading, downloading, preprocessing, client partition.

Everything here runs *before* federation starts and is method-independent:

    read_counts(path)     -> counts (cells x genes), labels or None     (HDF5 / .h5ad / CSV / TSV)
    resolve_data(name)    -> path of a benchmark file, downloaded and checksummed if missing
    preprocess(X, n)      -> float32 matrix, as contrastive-sc / scDeepCluster do it
    partition(y, ...)     -> one index array per client
    synthetic_counts(...) -> labelled toy counts for tests

Every problem a user can cause (a missing file, negative counts, too many types per client...)
raises DataError with a one-line message that says what to do; the scripts print it and exit.
"""
import hashlib
import heapq
import math
import os
import tempfile
import urllib.error
import urllib.request

import numpy as np
import scipy.sparse as sp


class DataError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


# ---------------------------------------------------------------------------------------------
# Benchmarks of the paper (files of the scDCC authors, Apache-2.0, pinned to a commit)
# ---------------------------------------------------------------------------------------------
SCDCC = "https://raw.githubusercontent.com/ttgump/scDCC/142e4e0370f4134751e92a160f95f97fce8db369/data/Small_Datasets/"
BENCHMARKS = {
    # name: file, sha256, HVGs kept (contrastive-sc optimum), types per client in the paper
    "10X_PBMC": dict(file="10X_PBMC_top2000.h5", n_genes=500, types_per_client=2,
                     sha256="ec78ead405dfa988d6156c12068b49c0782ca58f5ed52c938d8ba8e8377eb16e"),
    "mouse_bladder": dict(file="mouse_bladder_cell_top2000.h5", n_genes=1500, types_per_client=4,
                          sha256="2a97282cf325a4b2a63c2b818be82c453007f29838c7280f30dadd01be4501ab"),
    # out-of-sample check (Baron et al. 2016, GEO GSE84133, two mice); not downloadable from a pin
    "baron_mouse_pancreas": dict(file="baron_mouse_pancreas.h5", url=None, types_per_client=3,
                                 sha256="799d87f4a62ca46b9206579801e883cbde8c1e739b4b75f7ab1e949f25e88366"),
}
DEFAULT_N_GENES = 500  # for any other file (contrastive-sc's default); types per client: floor(C / K)


def data_dir():
    return os.environ.get("FEDSC_DATA_DIR", "./data")


def sha256sum(path):
    """sha256 of a file, or of a folder's files (names and contents, sorted), e.g. a 10x mtx folder."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
    for name in files:
        if os.path.isdir(path):
            h.update(os.path.basename(name).encode() + b"\0")
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def download(url, dest, sha256, timeout=30):
    """Fetch url to dest atomically (temp file + rename) after checking its sha256."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dest)), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
            while chunk := r.read(1 << 20):
                out.write(chunk)
        got = sha256sum(tmp)
        if got != sha256:
            raise DataError(f"download of {url} has sha256 {got}, expected {sha256}; "
                            f"fetch the file by hand and put it at {dest}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataError(f"could not download {url} ({e}); put the file at {dest} "
                        f"or set FEDSC_DATA_DIR to a folder that holds it") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def resolve_data(name):
    """A benchmark name -> its file in FEDSC_DATA_DIR (downloaded if absent); a path -> itself."""
    if name in BENCHMARKS:
        b = BENCHMARKS[name]
        path = os.path.join(data_dir(), b["file"])
        if not os.path.exists(path) and b.get("url", SCDCC) is None:
            raise DataError(f"{path} not found; put {b['file']} in $FEDSC_DATA_DIR (it is not downloadable here)")
        if not os.path.exists(path):
            print(f"{path} not found: downloading it from {SCDCC}", flush=True)
            download(SCDCC + b["file"], path, b["sha256"])
        return path
    if os.path.exists(name):
        return name
    if os.sep not in name and "." not in name:
        raise DataError(f"unknown dataset name '{name}': use one of {', '.join(BENCHMARKS)} "
                        f"or a path to an .h5/.h5ad/.csv/.tsv file")
    raise DataError(f"data file '{name}' does not exist; pass an existing path with --data")


# ---------------------------------------------------------------------------------------------
# Readers: each returns (counts, labels or None); counts are cells x genes, dense or sparse
# ---------------------------------------------------------------------------------------------
def _h5_matrix(node):
    """An h5py dataset (dense) or an AnnData sparse group (data/indices/indptr + shape)."""
    import h5py
    if isinstance(node, h5py.Dataset):
        return node[()]
    enc = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", b""))
    enc = enc.decode() if isinstance(enc, bytes) else str(enc)
    shape = tuple(node.attrs["shape"] if "shape" in node.attrs else node.attrs["h5sparse_shape"])
    cls = sp.csc_matrix if "csc" in enc else sp.csr_matrix
    return cls((node["data"][()], node["indices"][()], node["indptr"][()]), shape=shape)


def _decode(a):
    a = np.asarray(a)
    return a.astype(str) if a.dtype.kind in "SO" else a


def _h5ad_column(f, key):
    """An obs column of an .h5ad file: categorical (codes + categories) or plain."""
    obs = f["obs"]
    if key not in obs:
        cols = [k for k in obs.keys() if not k.startswith("_")]
        raise DataError(f"obs has no column '{key}'; columns are: {', '.join(cols)}")
    col = obs[key]
    if hasattr(col, "keys"):  # anndata >= 0.8 categorical: group with codes and categories
        codes, cats = col["codes"][()], _decode(col["categories"][()])
        return np.where(codes >= 0, cats[np.maximum(codes, 0)], None)
    values = _decode(col[()])
    if "__categories" in obs and key in obs["__categories"]:  # anndata < 0.8 categorical
        cats = _decode(obs["__categories"][key][()])
        return np.where(values >= 0, cats[np.maximum(values, 0)], None)
    return values


def _gene_expression(types):
    """Rows of a 10x feature list that are genes (Cell Ranger also lists antibody captures etc.)."""
    return np.ones(len(types), bool) if types is None else np.asarray(types).astype(str) == "Gene Expression"


def read_10x_h5(f, path, names):
    """Cell Ranger HDF5 (filtered_feature_bc_matrix.h5): v3 /matrix with features/, v2 /<genome>
    with genes/gene_names; genes x cells CSC, returned as cells x genes (gene expression only)."""
    g = f["matrix"] if "matrix" in f else f[next(k for k in f.keys() if "barcodes" in f[k])]
    X = sp.csc_matrix((g["data"][()], g["indices"][()], g["indptr"][()]), shape=tuple(g["shape"][()])).T.tocsr()
    if "features" in g:
        genes = _decode(g["features"]["name"][()])
        keep = _gene_expression(_decode(g["features"]["feature_type"][()]) if "feature_type" in g["features"] else None)
    else:
        genes, keep = _decode(g["gene_names"][()]), np.ones(X.shape[1], bool)
    names.update(genes=genes[keep], barcodes=_decode(g["barcodes"][()]))
    return X[:, np.flatnonzero(keep)], "10x HDF5" + ("" if keep.all() else f" ({keep.sum()} gene expression features)")


def read_10x_mtx(folder, names):
    """A 10x folder: matrix.mtx(.gz) (genes x cells), features.tsv(.gz) or genes.tsv, barcodes.tsv(.gz)."""
    import pandas as pd
    import scipy.io
    find = lambda *cands: next((os.path.join(folder, c) for c in cands if os.path.exists(os.path.join(folder, c))), None)
    mtx = find("matrix.mtx.gz", "matrix.mtx")
    feats, bcs = find("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"), find("barcodes.tsv.gz", "barcodes.tsv")
    if not (mtx and feats and bcs):
        raise DataError(f"'{folder}' is a folder but not a 10x matrix folder: it needs matrix.mtx(.gz), "
                        f"features.tsv(.gz) or genes.tsv, and barcodes.tsv(.gz)")
    try:
        X = sp.csr_matrix(scipy.io.mmread(mtx).T)
        features = pd.read_csv(feats, sep="\t", header=None, dtype=str)
        barcodes = pd.read_csv(bcs, sep="\t", header=None, dtype=str)[0].to_numpy()
    except Exception as e:  # scipy and pandas raise many kinds; all mean "not readable"
        raise DataError(f"cannot read the 10x folder '{folder}' ({type(e).__name__}: {e})") from None
    if len(features) != X.shape[1] or len(barcodes) != X.shape[0]:
        raise DataError(f"'{folder}': matrix.mtx is {X.shape[1]} genes x {X.shape[0]} cells but the folder "
                        f"lists {len(features)} features and {len(barcodes)} barcodes")
    keep = _gene_expression(features[2].to_numpy() if features.shape[1] > 2 else None)
    names.update(genes=features[1 if features.shape[1] > 1 else 0].to_numpy()[keep], barcodes=barcodes)
    return X[:, np.flatnonzero(keep)], "10x mtx folder"


def read_h5(path, label_key=None, layer=None, names=None):
    """scDeepCluster HDF5 (X, Y, optional label_names) or AnnData .h5ad (X, layers/<name>, raw/X,
    obs columns). Returns (counts, labels or None, which matrix was read)."""
    import h5py
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"cannot read '{path}' as HDF5 ({e})") from None
    names = {} if names is None else names
    with f:
        if "matrix" in f or any(isinstance(f[k], h5py.Group) and "barcodes" in f[k] for k in f.keys()):
            if layer or label_key:
                raise DataError(f"'{path}' is a 10x HDF5 file: it has no layers or labels (give --labels FILE)")
            X, used = read_10x_h5(f, path, names)
            return X, None, used
        if "obs" in f:  # AnnData layout
            if layer == "raw":
                if "raw" not in f or "X" not in f["raw"]:
                    raise DataError(f"'{path}' has no raw/X; layers are: {', '.join(f.get('layers', {}).keys()) or 'none'}")
                X, used = _h5_matrix(f["raw"]["X"]), "raw/X"
            elif layer:
                if "layers" not in f or layer not in f["layers"]:
                    raise DataError(f"'{path}' has no layers/{layer}; layers are: "
                                    f"{', '.join(f.get('layers', {}).keys()) or 'none'}{'; raw/X exists (--layer raw)' if 'raw' in f else ''}")
                X, used = _h5_matrix(f["layers"][layer]), f"layers/{layer}"
            elif "X" not in f:
                raise DataError(f"'{path}' is an AnnData file without X (no counts)")
            else:
                X, used = _h5_matrix(f["X"]), "X"
            others = [f"layers/{k}" for k in f.get("layers", {}).keys()] + (["raw/X"] if "raw" in f else [])
            var = f["raw"]["var"] if layer == "raw" and "var" in f["raw"] else f.get("var")
            for ours, group in (("genes", var), ("barcodes", f["obs"])):
                index = group.attrs.get("_index", "_index") if group is not None else None
                if group is not None and index in group and isinstance(group[index], h5py.Dataset):
                    names[ours] = _decode(group[index][()])
            y = _h5ad_column(f, label_key) if label_key else None
            return X, y, used + (f" (also in the file: {', '.join(others)})" if others else "")
        if layer:
            raise DataError(f"--layer is for .h5ad files; '{path}' is a plain HDF5 file")
        if "X" not in f:
            raise DataError(f"'{path}' holds no counts: expected a dataset 'X' (cells x genes); "
                            f"found {', '.join(f.keys()) or 'nothing'}")
        X = _h5_matrix(f["X"])
        key = label_key or "Y"
        y = f[key][()] if key in f else None
        if label_key and y is None:
            raise DataError(f"'{path}' has no labels dataset '{label_key}'")
        if y is not None and key == "Y" and "label_names" in f:  # integer codes -> their names
            y = _decode(f["label_names"][()])[np.asarray(y).astype(int)]
        for ours, theirs in (("genes", "gene_names"), ("barcodes", "cell_names")):
            if theirs in f:
                names[ours] = _decode(f[theirs][()])
        return X, _decode(y) if y is not None else None, "X"


def _data_not_names(names, header):
    """Header or first-column entries that look like counts rather than names: numbers with a
    decimal point or repeated (pandas renames a repeated header entry '0' to '0.1', '0.2'), or,
    for the first column, numbers that do not increase (row numbers, even filtered ones, do).
    Integer gene ids (Entrez) in a header and R's row numbers pass."""
    import re
    text = [re.sub(r"^(-?\d+(?:\.\d+)?)\.\d+$", r"\1", str(n)) for n in names]  # '0.0.1' -> '0.0'
    try:
        nums = np.array([float(t) for t in text])
    except ValueError:
        return False
    if len(nums) < 2:
        return False
    if header:
        return np.mean(["." in str(n) for n in names]) > 0.5 or len(set(text)) < len(text)
    return not (np.all(nums == np.round(nums)) and np.all(np.diff(nums) > 0))


def read_table(path, transpose=False):
    """A CSV/TSV table with a header row of names and a first column of names."""
    import pandas as pd
    sep = "," if path.endswith((".csv", ".csv.gz")) else "\t"
    try:
        df = pd.read_csv(path, sep=sep, index_col=0)
    except Exception as e:  # pandas raises many kinds; all mean "not a readable table"
        raise DataError(f"cannot read '{path}' as a table ({type(e).__name__}: {e})") from None
    if _data_not_names(list(df.columns), header=True):
        raise DataError(f"'{path}': the first line is numbers, not names, so it looks like data; the "
                        f"table needs a header line of gene names (cell names with --transpose) and a "
                        f"first column of cell (gene) names, or its first cell and gene are lost")
    if _data_not_names(list(df.index), header=False):
        raise DataError(f"'{path}': the first column is numbers but not increasing row numbers, so it looks like "
                        f"data; the table needs a first column of cell (or gene) names")
    if transpose:
        df = df.T
    try:
        return df.to_numpy(dtype=np.float64), np.asarray(df.index).astype(str), np.asarray(df.columns).astype(str)
    except ValueError:
        raise DataError(f"'{path}' has non-numeric entries; counts must be numbers "
                        f"(cells as rows, or genes as rows with --transpose)") from None


def _genes_as_rows(rows, cols):
    """True when the row names look like genes (Ensembl ids) or the column names like cell
    barcodes (a run of 10+ A/C/G/T): the table is probably genes x cells."""
    import re
    share = lambda names, pat: np.mean([bool(re.search(pat, str(n))) for n in names[:200]]) if len(names) else 0
    return share(rows, r"^ENS[A-Z]*G\d{6,}") > 0.5 or share(cols, r"[ACGT]{10,}") > 0.5


def read_labels(path):
    """One label per line (optionally a header line); with several columns (comma or tab) the last is used."""
    try:
        with open(path) as f:
            lines = [l.rstrip("\r\n") for l in f if l.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read labels file '{path}' ({e})") from None
    return np.array([l.replace("\t", ",").split(",")[-1].strip().strip('"') for l in lines])


def read_counts(path, label_key=None, labels=None, transpose=False, layer=None, names=None):
    """Pick the reader from the file itself: HDF5 (scDeepCluster X/Y, AnnData or 10x), a 10x mtx
    folder, or a text table. Returns (counts cells x genes, label codes or None, label names or
    None, which matrix was read); names (a dict), when given, gets the genes and barcodes found."""
    names = {} if names is None else names
    if os.path.isdir(path):
        if layer or label_key:
            raise DataError(f"'{path}' is a 10x folder: it has no layers or labels (give --labels FILE)")
        X, used = read_10x_mtx(path, names)
        y = None
        if labels:
            y = read_labels(labels)
            y = y[1:] if len(y) == X.shape[0] + 1 else y
        return check_counts(X, y, path) + (used,)
    if not os.path.isfile(path):
        raise DataError(f"data file '{path}' does not exist or is not a file")
    with open(path, "rb") as f:
        is_hdf5 = f.read(8) == b"\x89HDF\r\n\x1a\n"
    rows = None
    if is_hdf5:
        X, y, used = read_h5(path, label_key, layer, names)
        if transpose:
            X = X.T
    elif path.endswith((".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")):
        if layer or label_key:
            raise DataError(f"--{'layer' if layer else 'label-key'} is for HDF5 files; '{path}' is a table "
                            f"(give its labels with --labels FILE)")
        X, rows, cols = read_table(path, transpose)
        y, used = None, "table" + (" (transposed)" if transpose else "")
        names.update(barcodes=rows, genes=cols)
        if not transpose and _genes_as_rows(rows, cols):
            raise DataError(f"'{path}': the rows look like genes ({rows[0]}, ...) and the columns like "
                            f"cells ({cols[0]}, ...): the table is probably genes x cells; pass --transpose")
    else:
        raise DataError(f"'{path}' is neither HDF5 (.h5/.h5ad) nor a .csv/.tsv/.txt table")
    if labels:
        y = read_labels(labels)
        if len(y) == X.shape[0] + 1:  # a header line
            y = y[1:]
        if len(y) not in (X.shape[0], X.shape[0] + 1) and len(y) in (X.shape[1], X.shape[1] + 1):
            raise DataError(f"{len(y)} labels match the {X.shape[1]} columns, not the {X.shape[0]} rows: "
                            f"the counts are probably genes x cells; {'drop' if transpose else 'pass'} --transpose")
    return check_counts(X, y, path) + (used,)


def check_counts(X, y, what="data"):
    """Raw integer counts, cells x genes; labels -> codes 0..C-1 (sorted label order) and names."""
    if X.ndim != 2 or min(X.shape) == 0:
        raise DataError(f"{what}: counts must be a non-empty cells x genes matrix, got shape {X.shape}")
    vals = X.data if sp.issparse(X) else X
    if not np.issubdtype(vals.dtype, np.number):
        raise DataError(f"{what}: counts are not numeric (dtype {vals.dtype})")
    if np.isnan(vals).any() or np.isinf(vals).any():
        raise DataError(f"{what}: counts contain NaN or infinite values; raw counts are needed")
    if (vals < 0).any():
        raise DataError(f"{what}: counts contain negative values; pass raw (unnormalised) counts")
    if np.issubdtype(vals.dtype, np.floating):
        frac = vals[vals != np.round(vals)]
        if len(frac):
            raise DataError(f"{what}: counts are not integers ({len(frac)} values such as {frac[0]:.4g}): "
                            f"this looks log-normalised or scaled; pass raw UMI counts (for an .h5ad, "
                            f"--layer <name> reads layers/<name> and --layer raw reads raw/X)")
    names = None
    if y is not None:
        y = np.asarray(y)
        if len(y) != X.shape[0]:
            raise DataError(f"{what}: {len(y)} labels for {X.shape[0]} cells; they must match "
                            f"(cells are rows; use --transpose if genes are rows)")
        if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in y.tolist()):
            raise DataError(f"{what}: some labels are missing (NaN/None)")
        names, y = np.unique(y.astype(str) if y.dtype.kind in "OUS" else y, return_inverse=True)
        names, y = names.astype(str), y.astype(np.int64)
    return X, y, names


# ---------------------------------------------------------------------------------------------
# Preprocessing: contrastive-sc's train.preprocess + utils.normalize, in numpy
# ---------------------------------------------------------------------------------------------
def gene_stats(X):
    """Per-gene sufficient statistics of a cells x genes matrix (dense or sparse), in float64:
    (number of cells, sum, sum of squares). Sums of these over parts equal the pooled ones."""
    if sp.issparse(X):
        return X.shape[0], np.asarray(X.sum(0)).ravel(), np.asarray(X.multiply(X).sum(0)).ravel()
    return X.shape[0], X.sum(0), (X * X).sum(0)


def hvg_from_stats(n, total, total_sq, n_top, n_bins=20):
    """scanpy highly_variable_genes(flavor='seurat', n_top_genes=n_top) from per-gene statistics of
    the normalised (not log) values; returns a boolean gene mask."""
    mean = total / n
    return hvg_from_moments(mean, np.maximum(total_sq - n * mean ** 2, 0) / (n - 1), n_top, n_bins)


def hvg_from_moments(mean, var, n_top, n_bins=20):
    """The seurat HVG mask from per-gene means and variances (ddof=1) of the normalised values.
    Dispersion = var / mean, log-dispersions z-scored within 20 equal-width bins of log1p(mean)."""
    mean = mean.copy()
    mean[mean == 0] = 1e-12
    disp = var / mean
    disp[disp == 0] = np.nan
    disp = np.log(disp)
    lmean = np.log1p(mean)
    # pd.cut(lmean, 20): equal-width, right-closed bins, the lowest edge moved down by 0.1% of the range
    lo, hi = lmean.min(), lmean.max()
    if hi == lo:
        lo, hi = lo - 0.001 * abs(lo) if lo else -0.001, hi + 0.001 * abs(hi) if hi else 0.001
        edges = np.linspace(lo, hi, n_bins + 1)
    else:
        edges = np.linspace(lo, hi, n_bins + 1)
        edges[0] -= (hi - lo) * 0.001
    bins = np.clip(np.searchsorted(edges, lmean, side="left") - 1, 0, n_bins - 1)
    z = np.full_like(disp, np.nan)
    for b in np.unique(bins):
        sel = bins == b
        d = disp[sel]
        ok = ~np.isnan(d)
        m = d[ok].mean() if ok.any() else np.nan
        s = d[ok].std(ddof=1) if ok.sum() > 1 else np.nan
        if np.isnan(s):  # scanpy: a bin with a single gene gets mean 0, std = its value -> z = 1
            m, s = 0.0, m
        z[sel] = (d - m) / s
    ranked = np.sort(z[~np.isnan(z)])[::-1]
    if n_top >= len(ranked):
        return np.ones(len(z), bool)
    return np.nan_to_num(z) >= ranked[n_top - 1]


def hvg_seurat(X_log, n_top, n_bins=20):
    """The seurat HVG mask of a log1p matrix (dense or sparse)."""
    X = X_log.expm1() if sp.issparse(X_log) else np.expm1(X_log)
    return hvg_from_stats(*gene_stats(X), n_top, n_bins)


def preprocess(X, n_genes):
    """Raw counts -> float32 (cells x HVGs). Returns (matrix, kept cell indices, kept gene indices).
    drop empty genes/cells -> median library-size normalisation -> log1p -> seurat HVGs -> per-gene
    z-score (ddof=1, no clipping). Sparse input stays sparse: only the HVG columns become dense."""
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)  # the caller's matrix is never changed
    np.ceil(X.data, out=X.data)  # contrastive-sc ceils; raw counts are integers already (checked)
    genes = np.flatnonzero(np.asarray(X.sum(0)).ravel() >= 1)
    if len(genes) < X.shape[1]:
        X = X[:, genes]
    totals = np.asarray(X.sum(1)).ravel()
    cells = np.flatnonzero(totals >= 1)
    if len(cells) < X.shape[0]:
        X, totals = X[cells], totals[cells]
    if len(cells) < 2 or len(genes) < 2:
        raise DataError(f"after removing empty cells/genes only {len(cells)} cells x {len(genes)} genes are left")
    if n_genes > len(genes):
        print(f"--n-genes {n_genes} is more than the {len(genes)} non-empty genes: using all of them", flush=True)
    X.data *= np.repeat(np.median(totals) / totals, np.diff(X.indptr))  # each cell to the median library size
    keep = hvg_from_stats(*gene_stats(X), n_genes)
    X, genes = X[:, np.flatnonzero(keep)].toarray(), genes[keep]  # only the HVG columns become dense
    np.log1p(X, out=X)
    # per-gene z-score in place; the std in column blocks, so no second full-size array exists
    std = np.concatenate([X[:, j:j + 256].std(0, ddof=1) for j in range(0, X.shape[1], 256)])
    std[std == 0] = 1
    X -= X.mean(0)
    X /= std
    return X.astype(np.float32), cells, genes


# ---------------------------------------------------------------------------------------------
# Federated preprocessing: the same steps from per-site statistics. SITE functions see one site's
# counts; SERVER functions see only what the sites send: per-gene sums and moments, cell counts.
# ---------------------------------------------------------------------------------------------
def site_moments(X):
    """SITE: per-gene (n, mean, M2 = sum of squared deviations) of its cells, two-pass; a sparse
    matrix stays sparse (its zeros add (0 - mean)^2 each)."""
    n = X.shape[0]
    if not sp.issparse(X):
        mean = X.mean(0)
        return n, mean, ((X - mean) ** 2).sum(0)
    X = sp.csc_matrix(X)
    mean = np.asarray(X.sum(0)).ravel() / n
    nnz = np.diff(X.indptr)
    col = np.repeat(np.arange(X.shape[1]), nnz)
    m2 = np.bincount(col, (X.data - mean[col]) ** 2, minlength=X.shape[1]) + (n - nnz) * mean ** 2
    return n, mean, m2


def merge_moments(parts):
    """SERVER: Chan et al.'s pairwise merge of per-site (n, mean, M2) into the pooled ones."""
    n, mean, m2 = parts[0]
    for nb, mb, m2b in parts[1:]:
        delta, total = mb - mean, n + nb
        mean, m2, n = mean + delta * nb / total, m2 + m2b + delta ** 2 * n * nb / total, total
    return n, mean, m2


def federated_kth(count_at_most, k, hi):
    """SERVER: the k-th smallest (1-based) of the sites' integer values in [0, hi], by bisection:
    each query asks every site only how many of its values are <= t."""
    lo = 0
    while lo < hi:
        t = (lo + hi) // 2
        if sum(f(t) for f in count_at_most) >= k:
            hi = t
        else:
            lo = t + 1
    return lo


def preprocess_federated(sites, n_genes):
    """preprocess() over several sites without pooling their cells. sites: raw counts (cells x the
    same genes) per site. Returns (float32 matrix per site, kept cell indices per site, kept
    genes); equal to preprocess() of the stacked sites up to float rounding."""
    sites = [sp.csr_matrix(X, dtype=np.float64, copy=True) for X in sites]
    for X in sites:
        np.ceil(X.data, out=X.data)
    # genes: SITES send per-gene totals, the SERVER keeps the non-empty genes
    genes = np.flatnonzero(sum(np.asarray(X.sum(0)).ravel() for X in sites) >= 1)
    sites = [X[:, genes] for X in sites]
    # cells: each SITE drops its empty cells; library sizes stay on the sites
    cells = [np.flatnonzero(np.asarray(X.sum(1)).ravel() >= 1) for X in sites]
    sites = [X[c] for X, c in zip(sites, cells)]
    lib = [np.asarray(X.sum(1)).ravel() for X in sites]
    n = sum(len(l) for l in lib)
    if n < 2 or len(genes) < 2:
        raise DataError(f"after removing empty cells/genes only {n} cells x {len(genes)} genes are left")
    # median library size: the SERVER bisects on "how many of your cells have a total <= t"
    count_at_most = [lambda t, l=l: int((l <= t).sum()) for l in lib]
    hi = int(sum(l.sum() for l in lib))  # an aggregate bound: the sum of all counts
    median = federated_kth(count_at_most, (n + 1) // 2, hi)
    if n % 2 == 0:
        median = (median + federated_kth(count_at_most, n // 2 + 1, hi)) / 2
    for X, l in zip(sites, lib):  # each SITE scales its cells to the median
        X.data *= np.repeat(median / l, np.diff(X.indptr))
    # HVGs: SITES send per-gene moments of the normalised values, the SERVER picks the genes
    n_all, mean, m2 = merge_moments([site_moments(X) for X in sites])
    keep = hvg_from_moments(mean, m2 / (n_all - 1), n_genes)
    logs = [np.log1p(X[:, np.flatnonzero(keep)].toarray()) for X in sites]
    # scaling: SITES send moments of the log values, the SERVER returns each gene's mean and std
    _, mean, m2 = merge_moments([site_moments(L) for L in logs])
    std = np.sqrt(m2 / (n_all - 1))
    std[std == 0] = 1
    return [((L - mean) / std).astype(np.float32) for L in logs], cells, genes[keep]


def write_atomic(path, write):
    """write(tmp_path), then rename over path: readers see the old file or the whole new one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_column(path, key):
    """A per-cell column of a file: an HDF5 dataset (e.g. batch) or an .h5ad obs column, as text."""
    import h5py
    with h5py.File(path, "r") as f:
        if "obs" in f:
            return np.asarray(_h5ad_column(f, key)).astype(str)
        if key not in f:
            raise DataError(f"'{path}' has no dataset '{key}'; it has: {', '.join(f.keys())}")
        return _decode(f[key][()]).astype(str)


def write_h5(path, X, **datasets):
    """scDeepCluster-style HDF5 (X plus named datasets, text as UTF-8), gzip-compressed, atomically."""
    import h5py
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("X", data=X, compression="gzip")
            for k, v in datasets.items():
                v = np.asarray(v)
                f.create_dataset(k, data=v.astype(object) if v.dtype.kind in "OU" else v,
                                 dtype=h5py.string_dtype() if v.dtype.kind in "OU" else None)
    write_atomic(path, write)
    return path


# ---------------------------------------------------------------------------------------------
# Writing a site's annotated cells as .h5ad with h5py (the AnnData on-disk format, no anndata)
# ---------------------------------------------------------------------------------------------
def write_h5ad(path, X, cells, genes, categorical=None, obsm=None, uns=None):
    """An .h5ad that anndata.read_h5ad opens: X (cells x genes, float32), obs indexed by cells with
    categorical columns, var indexed by genes, obsm arrays and uns strings; written to a temporary
    file and renamed."""
    import h5py
    text = h5py.string_dtype()
    enc = lambda node, kind, version: node.attrs.update({"encoding-type": kind, "encoding-version": version})

    def frame(group, index, columns):
        enc(group, "dataframe", "0.2.0")
        group.attrs["_index"] = "_index"
        group.attrs.create("column-order", np.array(list(columns), dtype=object), dtype=text)
        group.create_dataset("_index", data=np.asarray(index).astype(str).astype(object), dtype=text)
        enc(group["_index"], "string-array", "0.2.0")
        for name, values in columns.items():
            cats, codes = np.unique(np.asarray(values).astype(str), return_inverse=True)
            col = group.create_group(name)
            enc(col, "categorical", "0.2.0")
            col.attrs["ordered"] = False
            col["codes"] = codes.astype(np.int32)
            enc(col["codes"], "array", "0.2.0")
            col.create_dataset("categories", data=cats.astype(object), dtype=text)
            enc(col["categories"], "string-array", "0.2.0")

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            enc(f, "anndata", "0.1.0")
            f["X"] = np.asarray(X, dtype=np.float32)
            enc(f["X"], "array", "0.2.0")
            frame(f.create_group("obs"), cells, categorical or {})
            frame(f.create_group("var"), genes, {})
            for name, items in (("obsm", obsm or {}), ("uns", uns or {})):
                g = f.create_group(name)
                enc(g, "dict", "0.1.0")
                for k, v in items.items():
                    if isinstance(v, str):
                        g.create_dataset(k, data=v, dtype=text)
                        enc(g[k], "string", "0.2.0")
                    else:
                        g[k] = np.asarray(v)
                        enc(g[k], "array", "0.2.0")
            for name in ("layers", "obsp", "varm", "varp"):
                enc(f.create_group(name), "dict", "0.1.0")
    write_atomic(path, write)
    return path


# ---------------------------------------------------------------------------------------------
# Client partition: EasyFL's non_iid_class heap algorithm, iid, dirichlet
# ---------------------------------------------------------------------------------------------
def equal_division(n_groups, idx, rng):
    """Shuffle and split into near-equal contiguous parts; the last (n mod p) parts get one more."""
    idx = rng.permutation(idx)
    base, extra = divmod(len(idx), n_groups)
    sizes = [base] * (n_groups - extra) + [base + 1] * extra
    return np.split(idx, np.cumsum(sizes)[:-1])


def partition(y, n_clients, scheme="class", types_per_client=2, alpha=0.5, seed=0,
              shuffle_classes=False, min_size=10, n_cells=None):
    """Cell indices per client. 'class': EasyFL non_iid_class (c types per client, min-heap over
    (times used, class id)); classes never popped are not used for training (e.g. bladder c=1).
    'iid': shuffled equal split. 'dirichlet': per-class Dir(alpha) proportions, resampled until
    every client holds min(min_size, N/K) cells. Unlabelled data (y None) needs n_cells."""
    rng = np.random.RandomState(seed)
    n = len(y) if y is not None else n_cells
    if scheme == "iid":
        parts = equal_division(n_clients, np.arange(n), rng)
    elif y is None:
        raise DataError(f"--partition {scheme} needs cell-type labels; use --partition iid for unlabelled data")
    elif scheme == "class":
        classes = np.unique(y)
        if types_per_client > len(classes):
            raise DataError(f"--types-per-client {types_per_client} is more than the {len(classes)} "
                            f"cell types in the data")
        if types_per_client < 1:
            raise DataError("--types-per-client must be at least 1")
        if shuffle_classes:
            classes = rng.permutation(classes)
        per_class = math.ceil(types_per_client * n_clients / len(classes))
        pieces = {c: equal_division(per_class, np.flatnonzero(y == c), rng) for c in classes}
        heap = [(0, int(i)) for i in range(len(classes))]  # (times consumed, position of the class)
        heapq.heapify(heap)
        parts = []
        for _ in range(n_clients):
            mine = []
            for _ in range(types_per_client):
                used, i = heapq.heappop(heap)
                mine.append(pieces[classes[i]][used])
                heapq.heappush(heap, (used + 1, i))
            parts.append(np.concatenate(mine))
    elif scheme == "dirichlet":
        need = min(min_size, n // n_clients)
        for _ in range(1000):
            parts = [[] for _ in range(n_clients)]
            for c in np.unique(y):
                idx = rng.permutation(np.flatnonzero(y == c))
                p = rng.dirichlet(alpha * np.ones(n_clients))
                p = p * np.array([len(q) < n / n_clients for q in parts])
                p = p / p.sum() if p.sum() > 0 else np.ones(n_clients) / n_clients
                cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
                for k, chunk in enumerate(np.split(idx, cuts)):
                    parts[k].extend(chunk.tolist())
            if min(len(q) for q in parts) >= need:
                break
        else:
            raise DataError(f"dirichlet partition with alpha={alpha} could not give every client "
                            f"{need} cells in 1000 draws; raise --dirichlet-alpha or use fewer clients")
        parts = [np.array(q, dtype=np.int64) for q in parts]
    else:
        raise DataError(f"unknown partition '{scheme}': use class, iid or dirichlet")
    parts = [np.sort(p).astype(np.int64) for p in parts]
    for k, p in enumerate(parts):
        if len(p) < 2:
            raise DataError(f"client {k} holds {len(p)} cell(s); every client needs at least 2 "
                            f"(BatchNorm): use fewer --clients or another --partition")
    return parts


# ---------------------------------------------------------------------------------------------
# Synthetic counts for tests: cell-type gene programs + negative-binomial noise
# ---------------------------------------------------------------------------------------------
def synthetic_counts(n_cells=400, n_genes=300, n_types=4, seed=0, dispersion=0.5, program_genes=30):
    """Each type up-regulates its own block of genes 4-fold over a log-normal baseline; counts are
    NB(mean, dispersion) (Poisson if dispersion=0) times a per-cell library size."""
    rng = np.random.RandomState(seed)
    y = rng.randint(0, n_types, n_cells)
    base = rng.lognormal(-1.0, 1.0, n_genes)
    mu = np.tile(base, (n_types, 1))
    for t in range(n_types):
        mu[t, rng.choice(n_genes, min(program_genes, n_genes), replace=False)] *= 4.0
    mean = mu[y] * rng.lognormal(0.0, 0.3, (n_cells, 1))
    if dispersion > 0:
        mean = rng.gamma(1.0 / dispersion, mean * dispersion)
    return rng.poisson(mean).astype(np.float32), y
