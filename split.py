"""Split one data file into one file per site, to try a real multi-site run (`--sites`).

    python split.py DATA --by batch [--out sites/]             # by a per-cell column (HDF5 dataset or .h5ad obs)
    python split.py DATA --by partition --clients 4 [--out sites/]   # by the class partition of the method files

Each site file is scDeepCluster-style HDF5 with names: X (raw counts, cells x genes), Y (label
codes) and label_names, gene_names, cell_names. Every reader of data.py, and so every method file,
takes it. Example: `python split.py baron_mouse_pancreas --by batch` gives one file per mouse.
"""
import cli  # first, before any other import: a Ctrl-C from here on ends with one line (cli.py)
import argparse
import os
import re

import common
import numpy as np
import scipy.sparse as sp
import formats
import data as D


def main(argv=None):
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a benchmark name or a path (any format --data takes)")
    p.add_argument("--by", required=True, help="'partition', or the name of a per-cell column (e.g. batch)")
    p.add_argument("--out", default="sites", help="folder for the site files (existing site files are never overwritten)")
    p.add_argument("--label-key", default="", help=".h5ad obs column (or HDF5 dataset) with the cell types")
    p.add_argument("--clients", type=int, help="--by partition: number of sites (default 4)")
    p.add_argument("--types-per-client", type=int, help="--by partition: 0 = floor(types / sites) (the default)")
    p.add_argument("--seed", type=int, help="--by partition: the partition's seed (default 0)")
    a = p.parse_args(argv)
    given = [f"--{k.replace('_', '-')}" for k in ("clients", "types_per_client", "seed") if getattr(a, k) is not None]
    if a.by != "partition" and given:
        p.error(f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to --by partition; --by {a.by} makes "
                f"one site of each value of '{a.by}'")
    a.clients, a.types_per_client, a.seed = (4 if a.clients is None else a.clients, a.types_per_client or 0,
                                             a.seed or 0)
    with common.user_errors():
        split(a)


def split(a):
    """Check everything, read the data, then write one file per site: all of them, or none."""
    check = common.check
    check(a.clients >= 1, f"--clients must be at least 1, got {a.clients}")
    check(a.types_per_client >= 0, f"--types-per-client must be at least 1 (or 0 = the default), got {a.types_per_client}")
    check(0 <= a.seed < 2 ** 32, f"--seed must be in [0, 2^32), got {a.seed}")
    check(not os.path.lexists(a.out) or os.path.isdir(a.out), f"--out '{a.out}' exists and is not a folder; give a folder for the site files")
    path = D.resolve_data(a.data)
    formats.check_path(path, "the data")
    if a.data in D.BENCHMARKS:  # a benchmark by name must be that very file, as the method files check
        cli.check_benchmark(a.data, cli.file_sha256(path), f"'{path}'")
    found = {}
    X, y, label_names, used = D.read_counts(path, a.label_key or None, names=found)
    if a.by == "partition":
        check(y is not None, f"'{path}' has no labels: --by partition needs them (or use --by COLUMN)")
        c = a.types_per_client or max(1, len(label_names) // a.clients)
        groups = {f"site{k}": idx for k, idx in enumerate(D.partition(y, a.clients, "class", c, seed=a.seed))}
        left = X.shape[0] - len(np.unique(np.concatenate(list(groups.values()))))
        print(f"{left} of {X.shape[0]} cells are on no site ({c} types per site, {a.clients} sites)"
              if left else f"every cell is on a site ({c} types per site)", flush=True)
    else:
        column = formats.read_column(path, a.by)
        check(len(column) == X.shape[0], f"'{a.by}' has {len(column)} values for {X.shape[0]} cells")
        groups = {re.sub(r"[^A-Za-z0-9_.-]+", "_", str(v)): np.flatnonzero(column == v) for v in np.unique(column)}
        check(len(groups) == len(np.unique(column)), f"two values of '{a.by}' give the same file name; rename them")
    small = next((f"'{name}' would hold {len(idx)} cell" for name, idx in groups.items() if len(idx) < 2), None)
    check(not small, f"site {small}; --sites needs at least 2 cells per site: merge it with another or drop it")
    stem = os.path.basename(path.rstrip(os.sep)).split(".")[0]
    outs = {name: os.path.join(a.out, f"{stem}_{name}.h5") for name in groups}
    for f in outs.values():
        formats.check_path_length(f, "a site file")
    taken = [f for f in outs.values() if os.path.lexists(f)]
    check(not taken, f"'{taken[0] if taken else ''}' exists: choose another --out (site files are never overwritten)")
    X = sp.csr_matrix(X)
    genes = found.get("genes", np.array([f"gene{i}" for i in range(X.shape[1])]))
    cells = found.get("barcodes", np.array([f"cell{i}" for i in range(X.shape[0])]))
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as e:
        raise D.DataError(f"cannot create the --out folder '{a.out}' ({e.strerror})") from None
    written = []
    try:
        for name, idx in groups.items():
            extra = {} if y is None else {"Y": y[idx], "label_names": label_names}
            written.append(outs[name])
            formats.write_h5(outs[name], X[idx].toarray(), gene_names=genes, cell_names=np.asarray(cells)[idx], **extra)
            print(f"{outs[name]}: {len(idx)} cells", flush=True)
    except BaseException:  # an interrupt or a full disk: no partial set of sites
        for f in written:
            if os.path.exists(f):
                os.remove(f)
        raise


if __name__ == "__main__":
    main()
