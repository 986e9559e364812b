"""Split one data file into one file per site, to try a real multi-site run (`--sites`).

    python split.py DATA --by batch [--out sites/]             # by a per-cell column (HDF5 dataset or .h5ad obs)
    python split.py DATA --by partition --clients 4 [--out sites/]   # by the class partition of the method files

Each site file is scDeepCluster-style HDF5 with names: X (raw counts, cells x genes), Y (label
codes) and label_names, gene_names, cell_names. Every reader of data.py, and so every method file,
takes it. Example: `python split.py baron_mouse_pancreas --by batch` gives one file per mouse.
"""
import argparse
import os

import numpy as np
import scipy.sparse as sp

import common
import formats
import data as D


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a benchmark name or a path (any format --data takes)")
    p.add_argument("--by", required=True, help="'partition', or the name of a per-cell column (e.g. batch)")
    p.add_argument("--out", default="sites", help="folder for the site files")
    p.add_argument("--label-key", default="", help=".h5ad obs column (or HDF5 dataset) with the cell types")
    p.add_argument("--clients", type=int, default=4, help="--by partition: number of sites")
    p.add_argument("--types-per-client", type=int, default=0, help="--by partition: 0 = floor(types / sites)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    with common.user_errors():
        path = D.resolve_data(a.data)
        found = {}
        X, y, label_names, used = D.read_counts(path, a.label_key or None, names=found)
        if a.by == "partition":
            common.check(y is not None, f"'{path}' has no labels: --by partition needs them (or use --by COLUMN)")
            c = a.types_per_client or max(1, len(label_names) // a.clients)
            groups = {f"site{k}": idx for k, idx in enumerate(D.partition(y, a.clients, "class", c, seed=a.seed))}
        else:
            column = formats.read_column(path, a.by)
            common.check(len(column) == X.shape[0], f"'{a.by}' has {len(column)} values for {X.shape[0]} cells")
            groups = {str(v): np.flatnonzero(column == v) for v in np.unique(column)}
        os.makedirs(a.out, exist_ok=True)
        stem = os.path.basename(path).split(".")[0]
        X = sp.csr_matrix(X)
        genes = found.get("genes", np.array([f"gene{i}" for i in range(X.shape[1])]))
        cells = found.get("barcodes", np.array([f"cell{i}" for i in range(X.shape[0])]))
        for name, idx in groups.items():
            out = os.path.join(a.out, f"{stem}_{name}.h5")
            extra = {} if y is None else {"Y": y[idx], "label_names": label_names}
            formats.write_h5(out, X[idx].toarray(), gene_names=genes, cell_names=np.asarray(cells)[idx], **extra)
            print(f"{out}: {len(idx)} cells", flush=True)


if __name__ == "__main__":
    main()
