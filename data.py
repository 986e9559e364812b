"""Data: reading, preprocessing and the client partition, shared by every method file.

Everything here runs *before* federation starts and is method-independent:

    read_counts(path)     -> counts (cells x genes), labels or None     (formats.py: HDF5 / .h5ad / 10x / CSV / TSV)
    preprocess(X, n)      -> float32 matrix, as contrastive-sc / scDeepCluster do it
    partition(y, ...)     -> one index array per client
    resolve_data(name)    -> path of a benchmark file, downloaded and checksummed if missing
    synthetic_counts(...) -> labelled toy counts for tests

Every problem a user can cause (a missing file, negative counts, too many types per client...)
raises DataError with a one-line message that says what to do; the scripts print it and exit.
"""
import dataclasses
import contextlib
import hashlib
import heapq
import math
import os
import tempfile
import time
import typing
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


MISSING_LABELS = ("", "na", "nan", "none", "null")  # a label written so (any case) is no label


class DataError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


# ---------------------------------------------------------------------------------------------
# Reading: the counts, their labels, and the checks every file passes
# ---------------------------------------------------------------------------------------------
def read_counts(path, label_key=None, labels=None, transpose=False, layer=None, names=None):
    """Pick the reader from the file itself: HDF5 (scDeepCluster X/Y, AnnData or 10x), a 10x mtx
    folder, or a text table. Returns (counts cells x genes, label codes or None, label names or
    None, which matrix was read); names (a dict), when given, gets the genes and barcodes found."""
    import formats
    names = {} if names is None else names
    if os.path.isdir(path):
        if layer or label_key or transpose:
            raise DataError(f"'{path}' is a 10x folder (genes x cells, read as cells x genes): it takes no "
                            f"--layer, --label-key or --transpose (give labels with --labels FILE)")
        (X, used), y = formats.read_10x_mtx(path, names), None
    elif not os.path.isfile(path):
        raise DataError(f"data file '{path}' does not exist or is not a file")
    else:
        with open(path, "rb") as f:
            is_hdf5 = f.read(8) == b"\x89HDF\r\n\x1a\n"
        if is_hdf5:
            X, y, used = formats.read_h5(path, label_key, layer, names, transpose)
        elif path.lower().endswith((".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")):
            if layer or label_key:
                raise DataError(f"--{'layer' if layer else 'label-key'} is for HDF5 files; '{path}' is a table "
                                f"(give its labels with --labels FILE)")
            X, rows, cols = formats.read_table(path, transpose)
            y, used = None, "table" + (" (transposed)" if transpose else "")
            names.update(barcodes=rows, genes=cols)
        else:
            raise DataError(f"'{path}' is neither HDF5 (.h5/.h5ad) nor a .csv/.tsv/.txt table")
    formats.check_orientation(names, path, transpose)
    if labels:  # one per cell; the header rule is formats.read_labels'
        y = formats.read_labels(labels, X.shape, transpose, names.get("barcodes"))
    formats.check_names(X, y, names, path)
    return check_counts(X, y, path) + (used,)


def check_counts(X, y, what="data"):
    """Raw integer counts, cells x genes; labels -> codes 0..C-1 (sorted label order) and names."""
    if X.ndim != 2 or min(X.shape) == 0:
        raise DataError(f"{what}: counts must be a non-empty cells x genes matrix, got shape {X.shape}")
    vals = X.data if sp.issparse(X) else X
    if vals.dtype.kind not in "iuf":
        raise DataError(f"{what}: counts are not real numbers (dtype {vals.dtype})")
    if np.isnan(vals).any() or np.isinf(vals).any():
        raise DataError(f"{what}: counts contain NaN or infinite values; raw counts are needed")
    if (vals < 0).any():
        raise DataError(f"{what}: counts contain negative values; pass raw (unnormalised) counts")
    if vals.size and float(vals.max()) > 2 ** 53:  # beyond that a float64 holds no exact integer: not a count
        raise DataError(f"{what}: counts up to {vals.max():.3g} are not raw counts (integers are exact only up to "
                        f"2^53 = 9.0e15); pass raw UMI counts")
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
        gone = [v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and v.strip().lower() in MISSING_LABELS)
                for v in y.tolist()]
        if any(gone):
            raise DataError(f"{what}: {sum(gone)} labels are missing (NaN, None, empty or 'nan'); every cell needs one")
        names, y = np.unique(y.astype(str) if y.dtype.kind in "OUS" else y, return_inverse=True)
        names, y = names.astype(str), y.astype(np.int64)
    return X, y, names


# ---------------------------------------------------------------------------------------------
# Preprocessing: contrastive-sc's train.preprocess + utils.normalize, in numpy
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Client partition: EasyFL's non_iid_class heap algorithm, iid, dirichlet
# ---------------------------------------------------------------------------------------------
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


def equal_division(n_groups, idx, rng):
    """Shuffle and split into near-equal contiguous parts; the last (n mod p) parts get one more."""
    idx = rng.permutation(idx)
    base, extra = divmod(len(idx), n_groups)
    sizes = [base] * (n_groups - extra) + [base + 1] * extra
    return np.split(idx, np.cumsum(sizes)[:-1])


@dataclass
class Data:
    X: np.ndarray            # preprocessed cells x genes (all cells; each client gets its rows)
    y: typing.Optional[np.ndarray]
    parts: list              # one index array per client
    n_clusters: int
    cells: np.ndarray        # row numbers of the kept cells in the input file
    label_names: typing.Optional[np.ndarray] = None
    barcodes: typing.Optional[np.ndarray] = None  # of the kept cells, when the file names them
    hvg: typing.Optional[np.ndarray] = None  # the selected genes, as columns of the (shared) input genes
    t_start: float = dataclasses.field(default_factory=time.time)


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


def check_folder(folder):
    """A folder that exists, or that can be made: no file where it or a folder above it should be."""
    above = os.path.abspath(folder)
    while not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise DataError(f"'{above}' is a file, not a folder; set FEDSC_DATA_DIR to the folder that holds the data")
    return folder


def download(url, dest, sha256, timeout=30):
    """Fetch url to dest atomically (temp file + rename) after checking its sha256; a failed download
    leaves nothing behind, not even the folders it made for dest."""
    folder = check_folder(os.path.dirname(os.path.abspath(dest)))
    made, parent, tmp = [], folder, None  # the folders this call creates, deepest first
    while not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
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
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        for d in made if not os.path.exists(dest) else []:
            with contextlib.suppress(OSError):
                os.rmdir(d)
    return dest


def resolve_data(name):
    """A benchmark name -> its file in FEDSC_DATA_DIR (downloaded if absent); a path -> itself."""
    if name in BENCHMARKS:
        b = BENCHMARKS[name]
        path = os.path.join(check_folder(data_dir()), b["file"])
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
