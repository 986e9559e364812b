"""File formats: the readers behind data.read_counts (scDeepCluster HDF5, AnnData .h5ad, Cell
Ranger HDF5 and mtx folders, CSV/TSV tables, labels files) and the writers (HDF5, .h5ad without
anndata, atomic writes). Support code, not the lesson. Every problem raises data.DataError.
"""
import collections
import os
import re

import numpy as np
import scipy.sparse as sp

from data import MISSING_LABELS, DataError


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
    shape = node.attrs.get("shape", node.attrs.get("h5sparse_shape"))
    missing = [k for k in ("data", "indices", "indptr") if k not in node]
    if missing or shape is None or not ("csr" in enc or "csc" in enc):
        raise DataError(f"'{node.name}' is a group but not a sparse matrix: it needs data, indices, indptr "
                        f"and a shape attribute with a csr/csc encoding (missing: {', '.join(missing + (['shape'] if shape is None else [])) or 'encoding'})")
    cls = sp.csc_matrix if "csc" in enc else sp.csr_matrix
    return _sparse(cls, (node["data"][()], node["indices"][()], node["indptr"][()]), shape, f"'{node.name}'")


def _sparse(cls, parts, shape, where):
    """A CSR/CSC matrix from stored parts, checked whole: an index beyond the shape or an indptr that
    goes down would otherwise be read out of bounds (a crash, or entries silently dropped)."""
    try:
        if any(np.ndim(a) != 1 for a in parts) or np.ndim(shape) != 1 or len(shape) != 2:
            raise ValueError("data, indices and indptr must be lists and the shape two numbers")
        m = cls(parts, shape=tuple(int(n) for n in shape))
        m.check_format(full_check=True)
        return m
    except (ValueError, TypeError, OverflowError) as e:
        raise DataError(f"{where}: the sparse matrix is inconsistent ({e})") from None


def _decode(a):
    """HDF5 text (bytes) as str, read as UTF-8: numpy's own conversion knows ASCII only."""
    a = np.asarray(a)
    if a.dtype.kind == "S":
        return np.char.decode(a, "utf-8")
    if a.dtype.kind == "O":
        return np.array([x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in a.ravel()]).reshape(a.shape)
    return a


def _h5ad_values(node):
    """An AnnData array element as an array with None where a value is missing: a plain dataset,
    a nullable integer / boolean / string array (values + mask), or a categorical (codes + categories)."""
    import h5py
    if isinstance(node, h5py.Dataset):
        return _decode(node[()])
    enc = node.attrs.get("encoding-type", "")
    enc = enc.decode() if isinstance(enc, bytes) else str(enc)
    if enc == "categorical" or {"codes", "categories"} <= set(node.keys()):
        return _named(node["codes"][()], _h5ad_values(node["categories"]), f"'{node.name}'")
    if {"values", "mask"} <= set(node.keys()):  # nullable-integer, nullable-boolean, nullable-string-array
        return np.where(node["mask"][()], None, _decode(node["values"][()]).astype(object))
    raise DataError(f"'{node.name}' is stored as '{enc or 'a group'}', which is not a column of values")


def _named(codes, cats, what):
    """Categorical codes as their names (a negative code is a missing value, None)."""
    codes, cats = np.asarray(codes).astype(int), np.asarray(cats).astype(object)
    if len(codes) and codes.max() >= len(cats):
        raise DataError(f"{what}: category codes go up to {codes.max()} but there are {len(cats)} categories")
    return np.where(codes >= 0, cats[np.maximum(codes, 0)], None)


def _compound(node):
    """An obs or var of anndata < 0.7: one table (an HDF5 compound dataset) rather than a group of columns."""
    import h5py
    return isinstance(node, h5py.Dataset) and node.dtype.names is not None


def _h5ad_column(f, key):
    """An obs column of an .h5ad file: plain, nullable or categorical (anndata >= 0.8, < 0.8, < 0.7)."""
    obs = f["obs"]
    if _compound(obs):  # anndata < 0.7: categoricals are codes, their names in uns/<key>_categories
        if key not in obs.dtype.names:
            raise DataError(f"obs has no column '{key}'; columns are: {', '.join(n for n in obs.dtype.names if n != 'index')}")
        values, cats = _decode(obs.fields(key)[()]), f.get(f"uns/{key}_categories")
        return values if cats is None else _named(values, _decode(cats[()]), f"obs column '{key}'")
    if key not in obs:
        cols = [k for k in obs.keys() if not k.startswith("_")]
        raise DataError(f"obs has no column '{key}'; columns are: {', '.join(cols)}")
    values = _h5ad_values(obs[key])
    if "__categories" in obs and key in obs["__categories"]:  # anndata < 0.8 categorical
        return _named(values, _decode(obs["__categories"][key][()]), f"obs column '{key}'")
    return values


def _gene_expression(types, n, path):
    """Rows of a 10x feature list that are genes (Cell Ranger also lists antibody captures etc.)."""
    keep = np.ones(n, bool) if types is None else np.asarray(types).astype(str) == "Gene Expression"
    if n and not keep.any():
        raise DataError(f"'{path}': none of its {n} features is 'Gene Expression' (they are "
                        f"{', '.join(sorted(set(np.asarray(types).astype(str)))[:3])}): no genes to cluster on")
    return keep


def read_10x_h5(f, path, names):
    """Cell Ranger HDF5 (filtered_feature_bc_matrix.h5): v3 /matrix with features/, v2 /<genome>
    with genes/gene_names; genes x cells CSC, returned as cells x genes (gene expression only)."""
    import h5py
    genomes = [k for k in f.keys() if isinstance(f[k], h5py.Group) and "barcodes" in f[k]]
    if "matrix" not in f and len(genomes) > 1:  # Cell Ranger v2 of a mixed-species sample: one group per genome
        raise DataError(f"'{path}' holds {len(genomes)} genomes ({', '.join(genomes)}), each its own matrix; reading "
                        f"one would drop the other's genes: write the one to cluster to its own file")
    g = f["matrix"] if "matrix" in f else f[genomes[0]]
    need = ["data", "indices", "indptr", "shape", "barcodes"] + (["features/name"] if "features" in g else ["gene_names"])
    missing = [k for k in need if k not in g]
    if missing:
        raise DataError(f"'{path}' looks like a 10x HDF5 file but its group '{g.name}' lacks {', '.join(missing)}")
    X = _sparse(sp.csc_matrix, (g["data"][()], g["indices"][()], g["indptr"][()]), g["shape"][()], f"'{path}'").T.tocsr()
    if "features" in g:
        genes = _decode(g["features"]["name"][()])
        keep = _gene_expression(_decode(g["features"]["feature_type"][()]) if "feature_type" in g["features"] else None, len(genes), path)
    else:
        genes = _decode(g["gene_names"][()])
        keep = np.ones(len(genes), bool)
    if len(genes) != X.shape[1] or len(keep) != X.shape[1]:
        raise DataError(f"'{path}': the 10x matrix has {X.shape[1]} features but the file names {len(genes)}")
    names.update(genes=genes[keep], barcodes=_decode(g["barcodes"][()]))
    return X[:, np.flatnonzero(keep)], "10x HDF5" + ("" if keep.all() else f" ({keep.sum()} gene expression features)")


def _10x_files(folder):
    """The matrix, features and barcodes files of a 10x folder."""
    find = lambda *cands: next((os.path.join(folder, c) for c in cands if os.path.isfile(os.path.join(folder, c))), None)
    files = find("matrix.mtx.gz", "matrix.mtx"), find("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"), \
        find("barcodes.tsv.gz", "barcodes.tsv")
    if not all(files):
        raise DataError(f"'{folder}' is a folder but not a 10x matrix folder: it needs matrix.mtx(.gz), "
                        f"features.tsv(.gz) or genes.tsv, and barcodes.tsv(.gz)")
    return files


def read_10x_mtx(folder, names):
    """A 10x folder: matrix.mtx(.gz) (genes x cells), features.tsv(.gz) or genes.tsv, barcodes.tsv(.gz)."""
    import pandas as pd
    import scipy.io
    mtx, feats, bcs = _10x_files(folder)
    try:
        X = sp.csr_matrix(scipy.io.mmread(mtx).T)
        features = pd.read_csv(feats, sep="\t", header=None, dtype=str)
        barcodes = pd.read_csv(bcs, sep="\t", header=None, dtype=str)[0].to_numpy()
    except Exception as e:  # scipy and pandas raise many kinds; all mean "not readable"
        raise DataError(f"cannot read the 10x folder '{folder}' ({type(e).__name__}: {e})") from None
    if len(features) != X.shape[1] or len(barcodes) != X.shape[0]:
        raise DataError(f"'{folder}': matrix.mtx is {X.shape[1]} genes x {X.shape[0]} cells but the folder "
                        f"lists {len(features)} features and {len(barcodes)} barcodes")
    keep = _gene_expression(features[2].to_numpy() if features.shape[1] > 2 else None, len(features), folder)
    names.update(genes=features[1 if features.shape[1] > 1 else 0].to_numpy()[keep], barcodes=barcodes)
    return X[:, np.flatnonzero(keep)], "10x mtx folder"


def read_h5(path, label_key=None, layer=None, names=None, transpose=False):
    """scDeepCluster HDF5 (X, Y, optional label_names) or AnnData .h5ad (X, layers/<name>, raw/X,
    obs columns). Returns (counts, labels or None, which matrix was read). With transpose the
    matrix is genes x cells on disk: it is transposed, and its gene and cell names swap places."""
    import h5py
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"cannot read '{path}' as HDF5 ({e})") from None
    names = {} if names is None else names
    try:
        with f:
            X, y, used = _read_h5(f, path, label_key, layer, names)
    except (OSError, KeyError, ValueError, TypeError, IndexError) as e:  # a damaged or unexpected file
        raise DataError(f"cannot read '{path}' ({type(e).__name__}: {e})") from None
    if transpose:
        if used.startswith("10x"):
            raise DataError(f"'{path}' is a 10x HDF5 file, always genes x cells on disk and read as cells x genes: drop --transpose")
        X = X.T
        genes, barcodes = names.pop("genes", None), names.pop("barcodes", None)
        names.update({k: v for k, v in (("genes", barcodes), ("barcodes", genes)) if v is not None})
    return X, y, used


def _read_h5(f, path, label_key, layer, names):
    import h5py
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
            if group is not None and _compound(group):
                if "index" in group.dtype.names:
                    names[ours] = _decode(group.fields("index")[()])
                continue
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
        label_names, y = _decode(f["label_names"][()]), np.asarray(y)
        if (y.dtype.kind not in "iuf" or y.ndim != 1 or not np.all(np.isfinite(y) & (y == np.round(y)))
                or (len(y) and (y.min() < 0 or y.max() >= len(label_names)))):
            raise DataError(f"'{path}': Y must hold one integer code 0..{len(label_names) - 1} of label_names per cell")
        y = label_names[y.astype(int)]
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
    import csv
    import gzip
    import pandas as pd
    try:
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rt", encoding="utf-8-sig", errors="replace") as f:
            first = next((line.rstrip("\r\n") for line in f if line.strip()), "")  # the header line, as pandas finds it
        fields = lambda c: next(csv.reader([first], delimiter=c), [])  # its names split at c, quotes respected
        sep = "," if path.lower().endswith((".csv", ".csv.gz")) else "\t"
        if sep not in first:  # the header line's separator (';', or a tab in a .csv)
            sep = max((sep, ",", "\t", ";"), key=lambda c: len(fields(c)))
        df, header = pd.read_csv(path, sep=sep, index_col=0), fields(sep)[1:]  # the names as written
    except Exception as e:  # pandas raises many kinds; all mean "not a readable table"
        raise DataError(f"cannot read '{path}' as a table ({type(e).__name__}: {e})") from None
    if len(header) == df.shape[1]:
        if len(header) > 1 and header[-1] == "" and df.iloc[:, -1].isna().all():  # every line ends with a separator
            df, header = df.iloc[:, :-1], header[:-1]
        df.columns = [str(h) for h in header]  # as written: pandas renames a repeated 'g0' to 'g0.1'
    if df.shape[0] == 0:
        raise DataError(f"'{path}' has a header line but no rows of counts")
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


# Genes that every scRNA-seq count table holds (mitochondrial, ribosomal, housekeeping), human or mouse
_GENE = re.compile(r"^(ENS[A-Z]*G\d{6,}(\.\d+)?|MT-.+|RP[LS]\d+[A-Z]?\d*|ACTB|GAPDH|B2M|MALAT1|TMSB4X|TMSB10|EEF1A1|TPT1|"
                   r"FTL1?|FTH1|UBB|UBC|HSP90AB1|PTMA|NEAT1|TUBA1B|PPIA|CD74|LYZ2?)$", re.IGNORECASE)


def _genes_as_rows(rows, cols):
    """True when the row names look like genes (Ensembl ids, or at least 3 well-known gene symbols
    where the columns have almost none) or the column names like cell barcodes (a run of 10+
    A/C/G/T): the table is then probably genes x cells."""
    share = lambda names, pat: np.mean([bool(re.search(pat, str(n))) for n in names[:200]]) if len(names) else 0
    genes = lambda names: sum(bool(_GENE.match(str(n))) for n in names)
    return (share(rows, r"^ENS[A-Z]*G\d{6,}") > 0.5 or share(cols, r"[ACGT]{10,}") > 0.5
            or genes(rows) >= max(3, 10 * genes(cols)))


def check_orientation(names, path, transpose):
    """Gene and cell names (when the file has both) that say the matrix is the other way round."""
    if names.get("genes") is not None and names.get("barcodes") is not None and _genes_as_rows(names["barcodes"], names["genes"]):
        raise DataError(f"'{path}': the cells are named like genes ({names['barcodes'][0]}, ...) and the genes like "
                        f"cells ({names['genes'][0]}, ...): the matrix is probably the other way round; "
                        f"{'drop' if transpose else 'pass'} --transpose")


def check_names(X, y, names, path):
    """Gene names, cell names and labels must each be a list with one entry per gene / cell, and the
    labels spell each type one way."""
    if np.ndim(X) != 2 and not sp.issparse(X):
        raise DataError(f"'{path}': counts of shape {np.shape(X)}; they must be a cells x genes matrix")
    for what, values, n, unit in (("gene names", names.get("genes"), X.shape[1], "genes"),
                                  ("cell names", names.get("barcodes"), X.shape[0], "cells"), ("labels", y, X.shape[0], "cells")):
        if values is not None and np.ndim(values) != 1:
            raise DataError(f"'{path}': {what} of shape {np.shape(values)}; there must be a list of one per {unit[:-1]}")
        if values is not None and len(values) != n:
            raise DataError(f"'{path}': {len(values)} {what} for {n} {unit}; they must match"
                            + (" (cells are rows; use --transpose if genes are rows)" if unit == "cells" else ""))
    two = None if y is None else one_spelling([np.unique(np.asarray(y).astype(str))])
    if two:
        raise DataError(f"'{path}': the labels spell one type {' and '.join(repr(x) for x in two)}; as two names "
                        f"they would be two cell types: use one spelling")


def one_spelling(groups):
    """Two spellings of one label name (case, spaces, '_', '-' or '.'; or one whole number: 1, 01,
    1.0) in label lists, or None."""
    by_text, by_number = {}, {}
    for n in groups:
        for x in map(str, n):
            if x.strip().lower() not in MISSING_LABELS:
                by_text.setdefault(re.sub(r"[\s_.-]+", " ", x.strip().lower()), set()).add(x)
                whole = re.fullmatch(r"\s*([-+]?)([0-9]+)(\.0*)?\s*", x)
                if whole:
                    digits = whole.group(2).lstrip("0") or "0"
                    by_number.setdefault(("-" if whole.group(1) == "-" and digits != "0" else "") + digits, set()).add(x)
    return next((sorted(v) for d in (by_text, by_number) for v in d.values() if len(v) > 1), None)


class Labels(str):
    """A --labels path that carries whether --labels-header declared its first line a header."""

    def __new__(cls, path, header=False):
        self = super().__new__(cls, path)
        self.header = header
        return self


HEADER_WORDS = {"label", "labels", "celltype", "celltypes", "cellclass", "type", "cluster", "clusters", "class",
                "annotation", "identity", "ident", "group", "x", "y"}  # column names, lower case, letters only


def read_labels(path, shape=None, transpose=False, barcodes=None):
    """One label per line, or two columns (comma or tab, quotes respected): cell name, label. With
    two columns whose names are the data's cell names, each cell gets its own line's label whatever
    the order; a first column of row numbers is an index (file order); one of names that are none of
    the data's cells is refused. More columns are refused (which one is the label?). The first line is a header, not a label, only
    when --labels-header declares it (a Labels path) or when it obviously is not a label of this
    data: a column name (label, cell_type, cluster, x, ...) or text above integer codes, found
    nowhere else in the file. Blank lines at the end are ignored; a blank or NA line elsewhere is a
    missing label. With shape (cells, genes): exactly one label per cell."""
    import csv
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = [l.rstrip("\r\n") for l in f]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read labels file '{path}' ({e})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    rows = list(csv.reader(lines, delimiter="\t" if lines and "\t" in lines[0] else ","))
    width = {len(r) for r in rows[1:] if r} or {len(r) for r in rows[:1]}  # a first line (header) may have 2
    if width - {1, 2} or len(width) > 1 or rows and len(rows[0]) > 2:
        raise DataError(f"labels file '{path}': lines of {' and '.join(map(str, sorted(width | {len(rows[0])})))} "
                        f"columns; give one label per line, or two columns: cell name, label")
    values = [r[-1].strip() if r else "" for r in rows]
    code = re.compile(r"-?\d+$")
    header = getattr(path, "header", False) or (len(values) > 1 and values[0] not in values[1:] and (
        re.sub(r"[^a-z]", "", values[0].lower()) in HEADER_WORDS
        or not re.match(r"-?[\d.]+(e-?\d+)?$", values[0]) and all(code.match(v) for v in values[1:])))
    labels = np.array(values[1:] if header else values)
    missing = [k + 1 + header for k, v in enumerate(labels) if v.lower() in MISSING_LABELS]
    if missing:
        raise DataError(f"labels file '{path}': line {missing[0]} has no label ({len(missing)} such line(s)); "
                        f"every cell needs one")
    ids = [r[0].strip() for r in rows[header:]] if width == {2} else []
    if ids and barcodes is not None and set(ids) & set(map(str, barcodes)):
        return _labels_by_name(path, ids, labels, [str(b) for b in barcodes])
    if ids and barcodes is not None and len(set(ids)) == len(ids) and not all(code.match(i) for i in ids if i):  # cell names
        raise DataError(f"labels file '{path}': its first column names cells ('{ids[0]}', ...) but none is a cell "
                        f"of the data ('{barcodes[0]}', ...); name the cells as the data does, or give one "
                        f"label per line in the order of the cells")
    if shape is None or len(labels) == shape[0]:
        return labels
    n = shape[0]
    if len(labels) == shape[1]:
        hint = (f"they match the {shape[1]} columns, not the {n} rows: the counts are probably genes x cells; "
                f"{'drop' if transpose else 'pass'} --transpose")
    elif len(labels) == n + 1 and not header:
        hint = f"if its first line ('{values[0]}') is a header, pass --labels-header"
    elif len(labels) == n - 1 and getattr(path, "header", False):
        hint = "--labels-header made its first line a header: drop it if that line is a label"
    else:
        hint = "they must match, one label per cell in the order of the cells"
    raise DataError(f"labels file '{path}': {len(labels)} labels for {n} cells; {hint}")


def _labels_by_name(path, ids, labels, cells):
    """Each cell's label from the line that names it (a cell with no line, or two, is an error; so is
    a name that two cells of the data share: which of them would the line label?)."""
    if len(set(cells)) < len(cells):
        dup = next(c for c, n in collections.Counter(cells).items() if n > 1)
        repeated = sum(n > 1 for n in collections.Counter(cells).values())
        raise DataError(f"labels file '{path}' names cells, but the data has two cells named '{dup}' "
                        f"({repeated} name(s) repeat): make the data's cell names unique")
    if len(set(ids)) < len(ids):
        dup = next(i for i, n in collections.Counter(ids).items() if n > 1)
        raise DataError(f"labels file '{path}': cell '{dup}' has more than one line")
    by_name = dict(zip(ids, labels))
    absent = [c for c in cells if c not in by_name]
    if absent:
        raise DataError(f"labels file '{path}': {len(absent)} of the {len(cells)} cells have no line (e.g. "
                        f"'{absent[0]}'); its first column names cells, so every cell needs its line")
    return np.array([by_name[c] for c in cells])


def read_column(path, key):
    """A per-cell column of a file: an HDF5 dataset (e.g. batch) or an .h5ad obs column, as text."""
    import h5py
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise DataError(f"'{path}' is not an HDF5 file: a per-cell column such as '{key}' is read from an "
                        f"HDF5 dataset or an .h5ad obs column") from None
    with f:
        if "obs" in f:
            values = _h5ad_column(f, key)
        elif key not in f or not isinstance(f[key], h5py.Dataset):
            raise DataError(f"'{path}' has no dataset '{key}'; it has: {', '.join(f.keys())}")
        else:
            values = _decode(f[key][()])
    values = np.asarray(values, dtype=object)
    missing = sum(v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip().lower() in ("", "na", "nan")
                  for v in values.tolist())  # "", "NA" and "NaN" written as text are no value
    if values.ndim != 1 or missing:
        raise DataError(f"'{path}': the column '{key}' must give every cell one value"
                        + (f" ({missing} cells have none)" if missing else f" (its shape is {values.shape})"))
    return values.astype(str)


def check_path(path, what):
    """An input named on the command line: a regular, non-empty file, or a 10x folder of such files;
    never a FIFO, device or socket (reading one blocks or never ends)."""
    import stat as S
    try:
        st = os.stat(path)
        mode, size = st.st_mode, st.st_size
    except OSError as e:
        raise DataError(f"{what} '{path}' cannot be opened ({e.strerror})") from None
    if S.S_ISDIR(mode):
        _10x_files(path)
        odd = [f for f in sorted(os.listdir(path)) if not os.path.isfile(os.path.join(path, f))]
        if odd:
            raise DataError(f"{what} '{path}' holds '{odd[0]}', which is not a file; a 10x folder holds only "
                            f"its matrix, features and barcodes files")
    elif not S.S_ISREG(mode):
        kind = "a FIFO" if S.S_ISFIFO(mode) else "a device" if S.S_ISCHR(mode) or S.S_ISBLK(mode) else "a socket"
        raise DataError(f"{what} '{path}' is {kind}, not a file; give a data file")
    elif size == 0:
        raise DataError(f"{what} '{path}' is empty")
    if not os.access(path, os.R_OK):
        raise DataError(f"{what} '{path}' is not readable")


TMP_SUFFIX = ".4194304.tmp"  # the longest name write_atomic gives a file while writing it (pid_max)


def check_path_length(path, what, room=0):
    """A path to be written (with write_atomic's temporary name): every folder and file name at most
    255 bytes, the whole at most 4096 with room bytes to spare for what goes under it, so that saving
    cannot fail on a name after training."""
    full = os.fsencode(os.path.abspath(path))
    parts, end = full.split(b"/"), len(TMP_SUFFIX)
    for i, part in enumerate(parts):
        most = 255 - end if i == len(parts) - 1 else 255  # the file's name gets the temporary suffix
        if len(part) > most:
            raise DataError(f"{what} '{path}': the name '{os.fsdecode(part[:40])}...' is {len(part)} bytes; a "
                            f"{'file' if most < 255 else 'folder'} name can have at most {most} here")
    if len(full) + end + room > 4096:
        raise DataError(f"{what} '{path}' is {len(full)} bytes long; paths can have at most {4096 - room - end} here")


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
