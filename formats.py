"""File formats: the readers behind data.read_counts (scDeepCluster HDF5, AnnData .h5ad, Cell
Ranger HDF5 and mtx folders, CSV/TSV tables, labels files) and the writers (HDF5, .h5ad without
anndata, atomic writes). Support code, not the lesson. Every problem raises data.DataError.
"""
import os

import numpy as np
import scipy.sparse as sp

from data import DataError


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


def read_column(path, key):
    """A per-cell column of a file: an HDF5 dataset (e.g. batch) or an .h5ad obs column, as text."""
    import h5py
    with h5py.File(path, "r") as f:
        if "obs" in f:
            return np.asarray(_h5ad_column(f, key)).astype(str)
        if key not in f:
            raise DataError(f"'{path}' has no dataset '{key}'; it has: {', '.join(f.keys())}")
        return _decode(f[key][()]).astype(str)


# ---------------------------------------------------------------------------------------------
# Writers: atomic, HDF5, and a site's annotated cells as .h5ad with h5py (no anndata)
# ---------------------------------------------------------------------------------------------
def write_atomic(path, write):
    """write(tmp_path), then rename over path: readers see the old file or the whole new one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
