"""Shared infrastructure for the method files (fedsimclr.py, fedsimsiam.py, fedmoco.py, fedbyol.py,
fedsc.py) and centralized.py.

Only infrastructure lives here. Each method file keeps its networks, its loss, its local update,
what a client uploads, how the server aggregates and how a client takes the global model back;
`federate` below only calls those functions in order. In reading order:

    DataArgs, FedArgs, parse_args  command-line arguments (dataclasses -> argparse), --recipe
    setup, load                    input checks, threads, seeding, config line, data, partition
    backbone, Encoder, two_views   the contrastive-sc encoder f, g(f(x)), random masking
    Client, batches, weights       a client's private state; shuffled batches; copies of weights
    fedavg                         the server's cell-weighted average
    federate                       rounds x clients: download -> local update -> upload; aggregate
    cluster_metrics, finish        KMeans on the global encoder, metrics, collapse signal, results
"""
import argparse
import ast
import concurrent.futures
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

import data as D

ROOT = os.path.dirname(os.path.abspath(__file__))
EMBED_DIM = 60    # backbone output f(x): what KMeans clusters (contrastive-sc's [200, 40, 60])
PROJ_DIM = 128    # head output g(f(x)) that the losses compare (the paper's 128-d predictor)
RECIPES = os.path.join(ROOT, "recipes.json")  # --recipe tuned values, written by run_all.sh tune
TEXT_COLUMNS = {k: str for k in ("code", "config_id", "commit", "data_sha256", "genes_sha", "run", "mu_by_round", "div_by_round")}  # hashes stay text


class Diverged(Exception):
    """Training produced NaN/inf: not an input error, a result (the row records it)."""


# ---------------------------------------------------------------------------------------------
# Arguments: dataclasses whose field docstrings become the --help text
# ---------------------------------------------------------------------------------------------
@dataclass
class DataArgs:
    """What every script shares: the data, how it is read, evaluation and output."""
    data: str = "10X_PBMC"
    """benchmark name (10X_PBMC, mouse_bladder, baron_mouse_pancreas; read from $FEDSC_DATA_DIR, default ./data, and downloaded if absent) or a path to an .h5/.h5ad/.csv/.tsv file"""
    seed: int = 0
    """seed of python, numpy and torch (model init, client partition, batches, masks, KMeans)"""
    threads: int = 1
    """cores to use: federated scripts train this many clients of a round at once (one torch thread each, the same result as one at a time)"""
    out: str = "runs/results.csv"
    """CSV file that gets one row per finished run; embedding and clusters go to <its folder>/runs/<run name>/"""
    n_genes: int = 0
    """highly variable genes kept; 0 = the benchmark's value (PBMC 500, bladder 1500), 500 for other data"""
    layer: str = ""
    """.h5ad only: read the raw counts from layers/<name>, or from raw/X with 'raw' (default: X)"""
    label_key: str = ""
    """.h5ad obs column (or HDF5 dataset) with the cell types; scDeepCluster files use Y"""
    labels: str = ""
    """a separate labels file, one label per line (for CSV/TSV counts)"""
    transpose: bool = False
    """the counts have genes as rows and cells as columns (CSV/TSV or HDF5)"""
    n_clusters: int = 0
    """KMeans clusters; 0 = number of true cell types (needed when the data has no labels)"""
    l2norm: bool = True
    """L2-normalise the embedding before KMeans (contrastive-sc does)"""


@dataclass
class FedArgs(DataArgs):
    """The federated protocol; defaults are the paper's (README: Protocol)."""
    sites: typing.List[str] = dataclasses.field(default_factory=list)
    """one data file per client (--sites a.h5ad b.h5ad ...): no partition; genes matched by name; preprocessing from per-site statistics (the same result as pooled); --data is then unused"""
    recipe: typing.Literal["paper", "tuned"] = "paper"
    """paper: the paper's protocol; tuned: this method's lr / rounds / local epochs chosen on 10X PBMC by run_all.sh tune (recipes.json); flags given explicitly still win"""
    clients: int = 4
    """number of clients K, all taking part in every round"""
    partition: typing.Literal["class", "iid", "dirichlet"] = "class"
    """how cells are split over clients: c cell types per client (EasyFL non_iid_class), iid, or dirichlet"""
    types_per_client: int = 0
    """cell types per client for --partition class; 0 = floor(types / clients), the paper's value on both benchmarks (PBMC 2, bladder 4); a larger value splits types and leaves parts of them on no client"""
    rounds: int = 300
    """communication rounds R"""
    local_epochs: int = 5
    """local epochs E per round"""
    batch_size: int = 128
    """batch size B (a client with fewer cells trains on one batch of all its cells)"""
    lr: float = 0.032
    """base learning rate of local SGD"""
    momentum: float = 0.5
    """SGD momentum (paper 0.5; EasyFL 0.9)"""
    weight_decay: float = 5e-4
    """SGD weight decay"""
    lr_schedule: typing.Literal["cosine", "constant"] = "cosine"
    """per-round learning rate: cosine from lr to 0 over the rounds (EasyFL default), or constant"""
    mask_rate: float = 0.9
    """random masking rate p of each augmented view (contrastive-sc input dropout 0.9)"""
    dirichlet_alpha: float = 0.5
    """concentration of --partition dirichlet (smaller = more skewed)"""
    shuffle_classes: bool = False
    """--partition class: permute the class ids (seeded) before the heap assignment"""
    eval_every: int = 0
    """also cluster, print ARI and the collapse signal every N rounds (0 = only at the end)"""
    embed: typing.Literal["backbone", "head"] = "backbone"
    """cluster the 60-d backbone output, or the 128-d head output"""
    bn_stats: typing.Literal["running", "recompute"] = "running"
    """BatchNorm statistics of the global encoder when it embeds the cells: running = the clients' running statistics averaged by FedAvg (the paper); recompute = recomputed from the cells of every site (sites send per-feature sums; README: Beyond the paper)"""
    preprocess: typing.Literal["pooled", "federated"] = "pooled"
    """pooled: preprocess all cells together before the split (the paper); federated: split the raw counts first, then preprocess from per-site statistics only (the same result)"""
    evaluate: typing.Literal["pooled", "federated", "both"] = "pooled"
    """pooled: KMeans and metrics on every cell's embedding in one place (the paper); federated: each site embeds its own cells, KMeans and ARI/NMI/CH from per-site sums, silhouette simplified (centroid-based); cells on no client are not evaluated; both: pooled, plus the federated metrics as fed_* columns (a simulation's comparison)"""


def _field_docs(cls):
    """Docstrings written under dataclass fields (the cleanrl/tyro convention)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass).lstrip()).body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = b.value.value
    return docs


def _parser(cls, with_defaults=True):
    docs = _field_docs(cls)
    p = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        if not f.init:  # derived fields (the method's name) are not options
            continue
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        kw = dict(default=f.default if with_defaults else argparse.SUPPRESS, help=docs.get(f.name, " "))
        if f.type is bool:  # False by default: a plain switch; True by default: --x / --no-x
            kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        elif typing.get_origin(f.type) is list:  # --sites a.h5ad b.h5ad ...
            kw.update(nargs="+", type=str, default=f.default_factory() if with_defaults else argparse.SUPPRESS)
        elif typing.get_origin(f.type) is typing.Literal:
            kw.update(choices=typing.get_args(f.type), type=type(typing.get_args(f.type)[0]))
        else:
            kw["type"] = f.type
        p.add_argument(*names, dest=f.name, **kw)
    return p


def parse_args(cls, argv=None):
    """The dataclass from the command line. With --recipe tuned, the method's tuned values from
    recipes.json replace the defaults of the options they name, unless given explicitly."""
    args = cls(**vars(_parser(cls).parse_args(argv)))
    args.method = args.method  # a derived field: an attribute of the instance, so rows record it
    if getattr(args, "recipe", "paper") == "tuned":
        given = vars(_parser(cls, with_defaults=False).parse_args(argv))
        recipe = tuned_recipe(args.method)
        for k, v in recipe.items():
            if k not in given:
                setattr(args, k, type(getattr(args, k))(v))
    return args


def tuned_recipe(method):
    if not os.path.exists(RECIPES):
        raise D.DataError(f"--recipe tuned needs {os.path.basename(RECIPES)}: run `bash run_all.sh tune` first")
    with open(RECIPES) as f:
        recipes = json.load(f)["recipes"]
    if method not in recipes:
        raise D.DataError(f"{os.path.basename(RECIPES)} has no tuned recipe for {method}: run `bash run_all.sh tune`")
    return recipes[method]


@contextlib.contextmanager
def user_errors():
    """Input problems end the run with one `error:` line and exit code 2 (no traceback, no row);
    a diverged training run ends with one `diverged:` line and exit code 3 (its row says so)."""
    try:
        yield
    except D.DataError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Diverged as e:
        print(f"diverged: {e}", file=sys.stderr, flush=True)
        sys.exit(3)


# ---------------------------------------------------------------------------------------------
# Setup: checks, threads, seeds, config, data and partition
# ---------------------------------------------------------------------------------------------
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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check(ok, msg):
    """An input check: raise the one-line user error msg unless ok."""
    if not ok:
        raise D.DataError(msg)


def check_args(args):
    """Every argument that can be checked without the data, before anything is read or trained
    (a method's own arguments are checked by its Args.__post_init__)."""
    need = check
    for name in ("threads",) + (("clients", "rounds", "local_epochs") if isinstance(args, FedArgs) else ()):
        need(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    need(0 <= args.seed < 2 ** 32, f"--seed must be in [0, 2^32), got {args.seed}")
    need(args.n_genes >= 0, f"--n-genes must be positive (or 0 for the default), got {args.n_genes}")
    need(args.n_clusters == 0 or args.n_clusters >= 2, f"--n-clusters must be at least 2 (or 0 = number of types), got {args.n_clusters}")
    if isinstance(args, FedArgs):
        if args.sites:
            args.clients = len(args.sites)  # one client per site file
        need(args.batch_size >= 2, f"--batch-size must be at least 2 (BatchNorm needs two cells), got {args.batch_size}")
        need(0 <= args.mask_rate < 1, f"--mask-rate must be in [0, 1), got {args.mask_rate}")
        need(args.lr > 0, f"--lr must be positive, got {args.lr}")
        need(args.types_per_client >= 0, f"--types-per-client must be at least 1 (or 0 = the default), got {args.types_per_client}")
        need(args.dirichlet_alpha > 0, f"--dirichlet-alpha must be positive, got {args.dirichlet_alpha}")
        need(args.eval_every >= 0, f"--eval-every must be 0 (off) or more, got {args.eval_every}")
        need(args.momentum >= 0 and args.weight_decay >= 0, "--momentum and --weight-decay must be 0 or more")
    check_out(args.out)


def check_out(out):
    """--out must be a results CSV (or a new file) in a folder we can write to."""
    if not os.path.basename(out):
        raise D.DataError(f"--out '{out}' names no file; give a CSV file path such as runs/results.csv")
    if os.path.isdir(out):
        raise D.DataError(f"--out '{out}' is a directory; give a CSV file path, e.g. {os.path.join(out, 'results.csv')}")
    if os.path.exists(out) and os.path.getsize(out) > 0:
        try:
            with open(out) as f:
                header = f.readline()
        except (OSError, UnicodeDecodeError) as e:
            raise D.DataError(f"--out '{out}' cannot be read as a results CSV ({e})") from None
        if "config_id" not in header.split(","):
            raise D.DataError(f"--out '{out}' exists and is not a results CSV of these scripts; "
                              f"choose another file (rows are appended, never overwritten)")
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise D.DataError(f"--out '{out}': cannot write to {folder} ({e.strerror or e})") from None


def code_hash(script):
    """sha256 (12 hex digits) of a script and of every module of its folder that it imports,
    transitively: a results row is reused only while the code that produced it is unchanged."""
    folder, seen, todo = os.path.dirname(os.path.abspath(script)), {}, [os.path.abspath(script)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = open(path, "rb").read()
        for node in ast.walk(ast.parse(seen[path])):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            todo += [p for p in (os.path.join(folder, n.split(".")[0] + ".py") for n in names) if os.path.exists(p)]
    h = hashlib.sha256()
    for path in sorted(seen):
        h.update(os.path.basename(path).encode() + b"\0" + seen[path])
    return h.hexdigest()[:12]


def git_commit():
    """The commit a run's code comes from, +modified when the checkout differs from it."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "--short", "HEAD")
        if head.returncode:
            return "unknown"
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", "*.py").stdout.strip()
        return head.stdout.strip() + ("+modified" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve(args, script=None):
    """Fill in what a run's row must record: dataset defaults (0 = the benchmark's value; a
    benchmark given by path is recognised by its sha256), the data file's sha256 and the code hash."""
    if getattr(args, "sites", None):  # the sites' files, in order
        for k, site in enumerate(args.sites):
            check(os.path.exists(site), f"site {k} ('{site}'): the file does not exist")
        digest = hashlib.sha256("".join(D.sha256sum(s) for s in args.sites).encode()).hexdigest()
    else:
        digest = D.sha256sum(D.resolve_data(args.data))
    bench = next((b for b in D.BENCHMARKS.values() if b["sha256"] == digest), {})
    args.n_genes = args.n_genes or bench.get("n_genes", D.DEFAULT_N_GENES)
    if isinstance(args, FedArgs) and not args.types_per_client and "types_per_client" in bench:
        args.types_per_client = bench["types_per_client"]
    args.data_sha256 = digest[:16]
    args.code = code_hash(script or sys.modules[type(args).__module__].__file__)  # the method's file
    return args


def load(args):
    """Read and preprocess the data; returns (Data without parts, the raw counts as read)."""
    path = D.resolve_data(args.data)
    found = {}  # gene names and barcodes, when the file has them
    counts, y, names, used = D.read_counts(path, args.label_key or None, args.labels or None,
                                           args.transpose, args.layer or None, found)
    if y is None and args.n_clusters < 1:
        raise D.DataError(f"'{path}' has no cell-type labels: pass --n-clusters to choose k "
                          f"(only the label-free metrics will be reported)")
    X, cells, genes = D.preprocess(counts, args.n_genes)
    y = None if y is None else y[cells]
    k = args.n_clusters or len(np.unique(y))
    if k > len(X):
        raise D.DataError(f"--n-clusters {k} is more than the {len(X)} cells")
    print(f"data {path} ({used}): {len(X)} cells x {X.shape[1]} genes, "
          f"{'no labels' if y is None else f'{len(np.unique(y))} types'}", flush=True)
    barcodes = found.get("barcodes")
    return Data(X, y, [], k, cells, names, None if barcodes is None else np.asarray(barcodes)[cells], genes), counts


def default_types_per_client(args, y):
    """--types-per-client 0 on other data than the benchmarks: floor(types / clients)."""
    if args.partition == "class" and y is not None and not args.types_per_client:
        args.types_per_client = max(1, len(np.unique(y)) // args.clients)
        print(f"types per client: {args.types_per_client} (floor of {len(np.unique(y))} types / {args.clients} clients)")


def load_federated(args):
    """Split the raw counts over the clients first, then preprocess them from per-site statistics
    (data.preprocess_federated); Data.X holds the sites' cells one site after another."""
    path = D.resolve_data(args.data)
    found = {}
    counts, y, names, used = D.read_counts(path, args.label_key or None, args.labels or None,
                                           args.transpose, args.layer or None, found)
    if y is None and args.n_clusters < 1:
        raise D.DataError(f"'{path}' has no cell-type labels: pass --n-clusters to choose k")
    default_types_per_client(args, y)
    parts = D.partition(y, args.clients, args.partition, args.types_per_client, args.dirichlet_alpha,
                        args.seed, args.shuffle_classes, n_cells=counts.shape[0])
    counts = sp.csr_matrix(counts)
    sites, kept, genes = D.preprocess_federated([counts[p] for p in parts], args.n_genes)
    cells = np.concatenate([p[k] for p, k in zip(parts, kept)])
    sizes = np.cumsum([0] + [len(k) for k in kept])
    for k, n in enumerate(np.diff(sizes)):
        if n < 2:
            raise D.DataError(f"client {k} holds {n} non-empty cell(s); every client needs at least 2")
    y = None if y is None else y[cells]
    barcodes = found.get("barcodes")
    data = Data(np.concatenate(sites), y, [np.arange(a, b) for a, b in zip(sizes[:-1], sizes[1:])],
                args.n_clusters or len(np.unique(y)), cells, names,
                None if barcodes is None else np.asarray(barcodes)[cells], genes)
    print(f"data {path} ({used}), preprocessed per site: {len(cells)} cells on the clients x "
          f"{len(genes)} genes", flush=True)
    return data


def load_sites(args):
    """--sites: one client per file. Each site reads its own file; the server learns only gene names
    (to match them) and label names; preprocessing uses per-site statistics only."""
    reads = []
    for k, path in enumerate(args.sites):
        found = {}
        try:
            counts, y, names, used = D.read_counts(path, args.label_key or None, None, args.transpose,
                                                   args.layer or None, found)
        except D.DataError as e:
            raise D.DataError(f"site {k} ('{path}'): {e}") from None
        if len(args.sites) > 1 and found.get("genes") is None:
            raise D.DataError(f"site {k} ('{path}') has no gene names, so its genes cannot be matched "
                              f"with the other sites'")
        barcodes = found.get("barcodes")
        if barcodes is not None and len(set(barcodes)) < len(barcodes):
            raise D.DataError(f"site {k} ('{path}') has duplicate cell barcodes")
        reads.append((counts, None if y is None else names[y], found.get("genes"), barcodes, used))
    genes = reads[0][2] if reads[0][2] is not None else None
    if genes is not None:
        for _, _, g, _, _ in reads[1:]:
            genes = genes[np.isin(genes, g)]  # the first site's order
        if len(genes) == 0:
            raise D.DataError("the sites share no gene name; check that they use the same gene naming")
        dropped = [int((~np.isin(g, genes)).sum()) for _, _, g, _, _ in reads]
        print(f"genes: {len(genes)} shared by all sites; dropped per site: {dropped}", flush=True)
        def columns(g):  # the shared genes' columns in one site's file
            where = dict(zip(g, range(len(g))))
            return [where[n] for n in genes]
        reads = [(X[:, columns(g)] if list(g) != list(genes) else X, y, g, b, u) for X, y, g, b, u in reads]
    labelled = [y is not None for _, y, _, _, _ in reads]
    if any(labelled) and not all(labelled):
        raise D.DataError(f"sites {[k for k, l in enumerate(labelled) if not l]} have no labels, others do")
    label_names = np.unique(np.concatenate([y for _, y, _, _, _ in reads])) if all(labelled) else None
    if label_names is None and args.n_clusters < 1:
        raise D.DataError("the sites have no cell-type labels: pass --n-clusters to choose k")
    sites, kept, used_genes = D.preprocess_federated([X for X, _, _, _, _ in reads], args.n_genes)
    for k, c in enumerate(kept):
        if len(c) < 2:
            raise D.DataError(f"site {k} ('{args.sites[k]}') has {len(c)} non-empty cell(s); every site needs at least 2")
    sizes = np.cumsum([0] + [len(c) for c in kept])
    y = None if label_names is None else np.concatenate(
        [np.searchsorted(label_names, r[1][c]) for r, c in zip(reads, kept)])
    barcodes = None if any(r[3] is None for r in reads) else np.concatenate([r[3][c] for r, c in zip(reads, kept)])
    for k, (path, c, r) in enumerate(zip(args.sites, kept, reads)):
        print(f"site {k} ({path}, {r[4]}): {len(c)} cells", flush=True)
    data = Data(np.concatenate(sites), y, [np.arange(a, b) for a, b in zip(sizes[:-1], sizes[1:])],
                args.n_clusters or len(label_names), np.concatenate(kept), label_names, barcodes, used_genes)
    data.genes = used_genes if genes is None else genes[used_genes]
    return data


def setup(args):
    """Check the arguments, resolve the defaults, print the config, seed everything, then load,
    preprocess and partition the data. Everything a user can get wrong fails here, before training."""
    t_start = time.time()
    check_args(args)
    resolve(args)
    torch.set_num_threads(1)  # one thread per op: parallelism is across clients (--threads)
    print(f"config {json.dumps(vars(args))}", flush=True)
    print(f"torch {torch.__version__}  clients trained at once {args.threads}", flush=True)
    seed_everything(args.seed)
    data = load_sites(args) if args.sites else load_federated(args) if args.preprocess == "federated" else load(args)[0]
    data.t_start = t_start
    if len(data.X) < args.clients:
        raise D.DataError(f"{len(data.X)} cells for {args.clients} clients; use fewer --clients")
    default_types_per_client(args, data.y)
    if args.preprocess == "pooled" and not args.sites:
        data.parts = D.partition(data.y, args.clients, args.partition, args.types_per_client,
                                 args.dirichlet_alpha, args.seed, args.shuffle_classes, n_cells=len(data.X))
    for k, idx in enumerate(data.parts):
        types = "" if data.y is None else f"  types {sorted(set(data.y[idx].tolist()))}"
        print(f"client {k}: {len(idx)} cells{types}", flush=True)
    unused = len(data.X) - len(np.unique(np.concatenate(data.parts)))
    if unused:
        print(f"{unused} cells belong to no client (not trained on; still evaluated)", flush=True)
    return data


# ---------------------------------------------------------------------------------------------
# Shared networks and augmentation
# ---------------------------------------------------------------------------------------------
def backbone(n_genes, dims=(200, 40, EMBED_DIM)):
    """contrastive-sc encoder f without its input dropout: Linear-BN-ReLU, Linear-BN-ReLU, Linear."""
    layers, d_in = [], n_genes
    for d in dims:
        layers += [nn.Linear(d_in, d), nn.BatchNorm1d(d), nn.ReLU()]
        d_in = d
    net = nn.Sequential(*layers[:-2])  # contrastive-sc drops the last BN and ReLU
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
    return net


class Encoder(nn.Module):
    """Online / target / key encoder g(f(x)); f is what gets clustered."""

    def __init__(self, f, g):
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x):
        return self.g(self.f(x))


def two_views(x, p, gen):
    """Random masking, twice: in each view every gene of every cell is zeroed with probability p,
    independently, and the rest scaled by 1/(1-p) (inverted dropout, as contrastive-sc's
    nn.Dropout); the data are scaled, so 0 is the gene's mean. One random draw for both views."""
    if p == 0:
        return x, x
    keep = torch.rand((2,) + x.shape, generator=gen) >= p
    v1, v2 = x * keep / (1 - p)
    return v1, v2


# ---------------------------------------------------------------------------------------------
# Clients: private data and state; batches; copies of weights
# ---------------------------------------------------------------------------------------------
@dataclass
class Client:
    cid: int
    x: torch.Tensor          # this client's cells: private, they never leave the client
    model: nn.ModuleDict     # the client's copy of every module (uploaded or kept local)
    gen: torch.Generator     # the client's own random numbers (batches, masks, MoCo's queue)
    state: dict = dataclasses.field(default_factory=dict)  # method-local state (FedSC's lambda, MoCo's queue)

    @property
    def n(self):
        return len(self.x)


def make_client(cid, x, model, seed):
    """A client with its cells, a copy of the server's initial model and its own seeded generator."""
    return Client(cid, x, copy.deepcopy(model), torch.Generator().manual_seed(1000 * seed + cid))


def learning_rate(args, rnd):
    """lr of round rnd (0-based): cosine from lr to 0 over the rounds, constant within a round."""
    if args.lr_schedule == "constant":
        return args.lr
    return 0.5 * args.lr * (1 + math.cos(math.pi * rnd / args.rounds))


def batches(n, batch_size, gen):
    """Shuffled batches; the incomplete last batch is dropped only if a full batch exists, and a
    batch of fewer than 2 cells is skipped (BatchNorm needs two)."""
    perm = torch.randperm(n, generator=gen)
    if n < batch_size:
        return [perm] if n >= 2 else []
    return list(perm[: n - n % batch_size].split(batch_size))


def weights(module):
    """A detached copy of a module's state (parameters and BN running statistics)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def ema_(target, online, tau):
    """target <- tau * target + (1 - tau) * online, parameter by parameter (BN buffers untouched)."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o, 1 - tau)


# ---------------------------------------------------------------------------------------------
# Server aggregation
# ---------------------------------------------------------------------------------------------
def fedavg(states, counts):
    """FedAvg: sum_k (N_k / N) W_k over every floating-point entry (BN running stats included);
    integer entries (BN num_batches_tracked) are taken from the first client."""
    w = torch.tensor(counts, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = sum(wk * s[key].double() for wk, s in zip(w, states)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


# ---------------------------------------------------------------------------------------------
# The federation loop: orchestration only, every step is the method file's function
# ---------------------------------------------------------------------------------------------
def federate(args, data, model, download, local_update, upload, aggregate):
    """Run args.rounds rounds; each one calls the method file's functions in this order:
        on every client:  download(client, global_state, args) -> dict of numbers to log
                          local_update(client, lr, args)       -> dict with its mean loss
                          upload(client)                       -> (weights, cell count)
        on the server:    global_state = aggregate(uploads)
    Loads the final global weights into model and returns the per-client, per-round log."""
    X = torch.from_numpy(data.X)
    # CLIENT SIDE: each client holds its own cells, a copy of the initial model and its own RNG
    clients = [make_client(k, X[idx].clone(), model, args.seed) for k, idx in enumerate(data.parts)]
    # SERVER SIDE: the global weights; round 0 broadcasts the seeded initial model
    global_state = {key: weights(module) for key, module in model.items()}

    def on_client(c, lr):  # ---- on client c: its cells and local state never leave it ---------
        entry = download(c, global_state, args)
        entry.update(local_update(c, lr, args))
        return upload(c), entry

    # --threads N trains N clients at once (each client has its own RNG: same result as one by one)
    pool = concurrent.futures.ThreadPoolExecutor(args.threads) if args.threads > 1 else None
    log, t_start = [], time.time()
    for rnd in range(args.rounds):
        t0, lr = time.time(), learning_rate(args, rnd)
        todo = (clients, [lr] * len(clients))
        uploads, logs = zip(*(pool.map(on_client, *todo) if pool else map(on_client, *todo)))
        global_state = aggregate(uploads)  # ---- on the server: only weights and counts arrive --
        log += [{"round": rnd + 1, "client": c.cid, "lr": lr, **e} for c, e in zip(clients, logs)]
        loss = float(np.mean([e["loss"] for e in logs]))
        if not math.isfinite(loss):  # a result, not an input error: the row records it
            save_run(args, data, log, "diverged")
            raise Diverged(f"round {rnd + 1}: the loss is {loss}; try a smaller --lr")
        line = f"round {rnd + 1}/{args.rounds}  loss {loss:.4f}  lr {lr:.4f}"
        for k in sorted({k for e in logs for k in e} - {"loss"}):  # e.g. FedSC's mu, one per client
            line += f"  {k} " + "/".join(f"{e[k]:.3f}" for e in logs if k in e)
        if args.eval_every and (rnd + 1) % args.eval_every == 0 and rnd + 1 < args.rounds:
            for key in global_state:
                model[key].load_state_dict(global_state[key])
            try:
                m, _ = cluster_metrics(embed(args, model, data.X), data.y, data.n_clusters, args.seed)
            except Diverged:
                save_run(args, data, log, "diverged")
                raise
            line += "".join(f"  {k} {m[k]:.2f}" for k in ("ari", "sil", "erank") if k in m)
        print(line + f"  {time.time() - t0:.2f}s", flush=True)
    for key in global_state:
        model[key].load_state_dict(global_state[key])
    if pool:
        pool.shutdown()
    print(f"trained {args.rounds} rounds in {time.time() - t_start:.1f}s", flush=True)
    return log


# ---------------------------------------------------------------------------------------------
# Evaluation and results
# ---------------------------------------------------------------------------------------------
COLLAPSE_ERANK = 2.0  # an embedding (of more than 2 dimensions) with a lower effective rank has collapsed


def collapsed(h, erank):
    return h.shape[1] > 2 and erank < COLLAPSE_ERANK


def site_bn_moments(net, x, bn):
    """SITE: (n, sum, sum of squares) per feature of what BatchNorm layer bn receives when the site's
    cells go through net (eval mode): three vectors, no row per cell."""
    seen = []
    handle = bn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].double()))
    try:
        net(x)
    finally:
        handle.remove()
    a = seen[0]
    return len(a), a.sum(0), (a * a).sum(0)


def merge_bn_moments(parts):
    """SERVER: the pooled mean and (biased, as BatchNorm's training mode uses) variance per feature."""
    n = sum(p[0] for p in parts)
    mean = sum(p[1] for p in parts) / n
    return mean, (sum(p[2] for p in parts) / n - mean * mean).clamp_min(0)


@torch.no_grad()
def recompute_bn(net, sites):
    """--bn-stats recompute: FedAvg averages the clients' BatchNorm running statistics, and with
    non-IID clients the average of per-client variances misses the variance between clients. Each
    BatchNorm layer, in order, gets the mean and variance of its input over the cells of all sites
    (sites send per-feature sums, SERVER merges them), so that in eval mode the encoder normalises
    as it would in training mode on one batch of every cell."""
    net.eval()
    for bn in [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]:
        mean, var = merge_bn_moments([site_bn_moments(net, x, bn) for x in sites])
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


@torch.no_grad()
def embed(args, model, X, sites=None):
    """All cells through the global online encoder (MoCo: encoder_q), eval mode, unmasked. With
    --bn-stats recompute, a copy of the encoder first takes its BatchNorm statistics from sites
    (a list of cell matrices, one per site; default: every cell as one site)."""
    enc = model["online"]
    if getattr(args, "bn_stats", "running") == "recompute":
        enc = copy.deepcopy(enc)
        recompute_bn(enc, [torch.from_numpy(X)] if sites is None else [torch.from_numpy(s) for s in sites])
    enc.eval()
    h = (enc.f if args.embed == "backbone" else enc)(torch.from_numpy(X))
    enc.train()
    if args.l2norm:
        h = F.normalize(h, dim=1)
    return h.numpy().astype(np.float64)


def effective_rank(h):
    """exp(entropy of the normalised singular values) of the centred embedding: 1 when every cell
    lies on one line, the dimension when all directions are used equally. Label-free."""
    return rank_from_scatter(*site_scatter(h)[2:])


def site_scatter(h):
    """SITE: (n, mean, centred scatter matrix d x d) of its embeddings; sites merge like moments."""
    mean = h.mean(0)
    return len(h), mean, (h - mean).T @ (h - mean)


def merge_scatter(parts):
    """SERVER: the pooled (n, mean, scatter) from the sites' (Chan et al., with outer products)."""
    n, mean, s = parts[0]
    for nb, mb, sb in parts[1:]:
        delta, total = mb - mean, n + nb
        mean, s, n = mean + delta * nb / total, s + sb + np.outer(delta, delta) * n * nb / total, total
    return n, mean, s


def rank_from_scatter(scatter):
    """Effective rank from the scatter matrix: its eigenvalues are the squared singular values."""
    s = np.sqrt(np.clip(np.linalg.eigvalsh(scatter), 0, None))
    if s.sum() <= 0 or not np.isfinite(s).all():
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def cluster_metrics(h, y, n_clusters, seed):
    """KMeans(k-means++, n_init=10, random_state=seed); ARI and NMI against y when given,
    silhouette (on the embedding, predicted labels; a 5000-cell sample above that), Calinski-
    Harabasz, and the embedding's effective rank. ARI/NMI/silhouette in percent, as the paper.
    KMeans runs on one thread: with more, its sums change in the last bits and a near-tie between
    restarts could pick other clusters, so --threads would change the result."""
    from sklearn.cluster import KMeans
    from sklearn import metrics as M
    from threadpoolctl import threadpool_limits
    if not np.isfinite(h).all():
        raise Diverged("the embedding holds NaN or inf values; try a smaller --lr")
    out = {"erank": effective_rank(h)}
    with threadpool_limits(1):
        pred = KMeans(n_clusters=n_clusters, init="k-means++", n_init=10, random_state=seed).fit_predict(h)
    if y is not None:
        out["ari"] = 100 * M.adjusted_rand_score(y, pred)
        out["nmi"] = 100 * M.normalized_mutual_info_score(y, pred)
    if len(np.unique(pred)) > 1:
        sample = 5000 if len(h) > 5000 else None
        out["sil"] = 100 * M.silhouette_score(h, pred, sample_size=sample, random_state=seed)
        out["ch"] = M.calinski_harabasz_score(h, pred)
    else:
        out["sil"] = out["ch"] = float("nan")
    return out, pred


# ---------------------------------------------------------------------------------------------
# Federated evaluation: SITE functions see one site's embedding; the SERVER gets per-cluster sums,
# counts, inertias and contingency tables, never one row per cell
# ---------------------------------------------------------------------------------------------
def site_assign(h, centroids, previous=None):
    """SITE: the nearest centroid of each of its cells (kept on the site) and what it sends: per-
    cluster sums, counts and inertia, and how many of its cells changed cluster."""
    d = (h ** 2).sum(1)[:, None] - 2 * h @ centroids.T + (centroids ** 2).sum(1)[None]
    labels = d.argmin(1)
    k = len(centroids)
    sums = np.zeros_like(centroids)
    np.add.at(sums, labels, h)
    changed = len(h) if previous is None else int((labels != previous).sum())
    sent = (sums, np.bincount(labels, minlength=k), np.maximum(d[np.arange(len(h)), labels], 0).sum(), changed)
    return labels, sent


def federated_lloyd(sites, centroids, max_iter=300):
    """SERVER: Lloyd's KMeans over the sites: each iteration the sites assign their cells and send
    per-cluster sums and counts; the server moves the centroids (an empty cluster keeps its
    centroid). Stops when no cell changed cluster. Returns (centroids, the sites' labels, inertia);
    the labels are the sites' own, the server only ever reads `sent`."""
    labels = [None] * len(sites)
    for _ in range(max_iter):
        results = [site_assign(h, centroids, old) for h, old in zip(sites, labels)]  # on each SITE
        labels = [l for l, _ in results]
        sent = [s for _, s in results]  # SITE -> SERVER: no array with a row per cell
        sums, counts = sum(s[0] for s in sent), sum(s[1] for s in sent)
        if sum(s[3] for s in sent) == 0:
            break
        centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
    return centroids, labels, sum(s[2] for s in sent)


def federated_kmeans(sites, k, seed, n_init=10):
    """SERVER: KMeans without pooling embeddings. Each site runs a local KMeans and sends its k
    centroids with their cell counts; the server seeds each restart by weighted k-means++ over
    those centroids, runs federated Lloyd, and keeps the restart with the smallest summed inertia."""
    from sklearn.cluster import KMeans, kmeans_plusplus
    local, weights = [], []
    for h in sites:  # on each SITE: k local centroids (fewer if it has fewer cells) and their sizes
        km = KMeans(min(k, len(h)), n_init=1, random_state=seed).fit(h)
        local.append(km.cluster_centers_)
        weights.append(np.bincount(km.labels_, minlength=len(km.cluster_centers_)))
    local, weights = np.concatenate(local), np.concatenate(weights).astype(float)
    rng, best = np.random.RandomState(seed), None
    for _ in range(n_init):
        init, _ = kmeans_plusplus(local, k, sample_weight=weights, random_state=rng)
        fit = federated_lloyd(sites, init)
        if best is None or fit[2] < best[2]:
            best = fit
    return best


def site_contingency(y, labels, n_classes, k):
    """SITE: counts of (true type, cluster) pairs over its cells."""
    return np.bincount(y * k + labels, minlength=n_classes * k).reshape(n_classes, k)


def scores_from_contingency(table):
    """SERVER: ARI and NMI (arithmetic) from the summed contingency table, in percent."""
    from sklearn.metrics.cluster import mutual_info_score
    comb = lambda x: (x * (x - 1) / 2).sum()
    n, a, b = table.sum(), comb(table.sum(1)), comb(table.sum(0))
    expected = a * b / (n * (n - 1) / 2)
    ari = (comb(table) - expected) / ((a + b) / 2 - expected) if (a + b) / 2 != expected else 1.0
    entropy = lambda p: -(p[p > 0] / n * np.log(p[p > 0] / n)).sum()
    h_true, h_pred = entropy(table.sum(1)), entropy(table.sum(0))
    mi = mutual_info_score(None, None, contingency=table)
    nmi = 1.0 if h_true == h_pred == 0 else mi / max((h_true + h_pred) / 2, 1e-300)
    return 100 * ari, 100 * nmi


def append_row(path, row):
    """Append one row to a CSV under a lock, by writing a new file and renaming it over the old:
    an interrupted or parallel run never leaves a half-written row."""
    import pandas as pd
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _locked(path + ".lock"):
        old = pd.read_csv(path, dtype=str, keep_default_na=False) if os.path.exists(path) else pd.DataFrame()
        new = pd.concat([old, pd.DataFrame([row])], ignore_index=True)
        D.write_atomic(path, lambda tmp: new.to_csv(tmp, index=False))


@contextlib.contextmanager
def _locked(lock_path):
    with open(lock_path, "a+") as lock:
        if os.name == "nt":  # Windows
            import msvcrt
            msvcrt.locking(lock.fileno(), msvcrt.LK_LOCK, 1)
        else:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_folder(args):
    """A fresh folder for this run's files: no spaces, never shared with a concurrent run."""
    import re
    data_name = "sites" if getattr(args, "sites", None) else os.path.basename(str(args.data)).split('.')[0]
    name = f"{data_name}__{args.method}__s{args.seed}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    runs = os.path.join(os.path.dirname(os.path.abspath(args.out)), "runs")
    os.makedirs(runs, exist_ok=True)
    return tempfile.mkdtemp(prefix=name + "__" + time.strftime("%Y%m%d-%H%M%S") + "__", dir=runs)


def federated_metrics(h, data, seed):
    """--evaluate federated: each client embeds its own cells (the rows data.parts[k] of h) and
    only per-cluster sums, counts, inertias and contingency tables reach the server. Cells held by
    no client are not evaluated (pred = -1)."""
    if not np.isfinite(h).all():
        raise Diverged("the embedding holds NaN or inf values; try a smaller --lr")
    sites = [h[idx] for idx in data.parts]
    cent, labels, inertia = federated_kmeans(sites, data.n_clusters, seed)
    out = {"erank": rank_from_scatter(merge_scatter([site_scatter(s) for s in sites])[2])}
    k, n = len(cent), sum(len(s) for s in sites)
    if data.y is not None:
        n_classes = int(data.y.max()) + 1
        table = sum(site_contingency(data.y[idx], l, n_classes, k) for idx, l in zip(data.parts, labels))
        out["ari"], out["nmi"] = scores_from_contingency(table)
    counts = sum(np.bincount(l, minlength=k) for l in labels)
    mean = sum(s.sum(0) for s in sites) / n  # SERVER: from per-site sums
    between = (counts * ((cent - mean) ** 2).sum(1)).sum()
    out["ch"] = between / (k - 1) / (inertia / (n - k)) if inertia > 0 and (counts > 0).sum() > 1 else float("nan")
    sil = 0.0
    for s, l in zip(sites, labels):  # SITE: simplified silhouette of its cells, summed
        d = np.sqrt(np.maximum((s ** 2).sum(1)[:, None] - 2 * s @ cent.T + (cent ** 2).sum(1)[None], 0))
        a = d[np.arange(len(s)), l]
        d[np.arange(len(s)), l] = np.inf
        b = d.min(1)
        sil += np.where(np.maximum(a, b) > 0, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0).sum()
    out["sil_simplified"] = 100 * sil / n
    pred = np.full(len(h), -1)
    for idx, l in zip(data.parts, labels):
        pred[idx] = l
    return out, pred


def finish(args, data, model=None, log=None, h=None):
    """Cluster the final global encoder's embedding (or a given one, h) and save the run."""
    evaluate = getattr(args, "evaluate", "pooled")
    sites = lambda: [data.X[idx] for idx in data.parts]  # --bn-stats recompute from the sites' cells only
    if h is None:
        h = embed(args, model, data.X, sites() if evaluate == "federated" else None)
    try:
        if evaluate == "federated":
            metrics, pred = federated_metrics(h, data, args.seed)
        else:
            metrics, pred = cluster_metrics(h, data.y, data.n_clusters, args.seed)
        if evaluate == "both":
            h_fed = h if model is None else embed(args, model, data.X, sites())
            metrics |= {f"fed_{k}": v for k, v in federated_metrics(h_fed, data, args.seed)[0].items()}
        if getattr(args, "bn_stats", "running") == "recompute" and model is not None and evaluate != "federated":
            # the same encoder with FedAvg's running statistics, as bn_running_* columns: the tuning
            # grid compares both BatchNorm choices without training twice
            plain = copy.copy(args)
            plain.bn_stats = "running"
            m, _ = cluster_metrics(embed(plain, model, data.X), data.y, data.n_clusters, args.seed)
            metrics |= {f"bn_running_{k}": m[k] for k in ("ari", "nmi", "sil") if k in m}
    except Diverged:  # NaN weights after the last step: the row says so
        save_run(args, data, log, "diverged")
        raise
    if collapsed(h, metrics["erank"]):
        print(f"warning: the embedding has collapsed (effective rank {metrics['erank']:.2f} < "
              f"{COLLAPSE_ERANK}): its clusters mean little; try another --lr or method", flush=True)
    print("final  " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())
          + f"  time {time.time() - data.t_start:.1f}s", flush=True)
    return save_run(args, data, log, "ok", metrics, h, pred)


def save_run(args, data, log, status, metrics=None, h=None, pred=None):
    """Write the run's folder (embedding, clusters with the input's row numbers and label names,
    per-round log, result.json), each file atomically, then append the results row last: a row
    means a whole run. A diverged run gets a row too, with status 'diverged' and no metrics."""
    import pandas as pd
    run_dir = run_folder(args)
    if h is not None:
        D.write_atomic(os.path.join(run_dir, "embedding.npy"),
                      lambda tmp: np.save(open(tmp, "wb"), h.astype(np.float32)))
    if pred is not None:
        client = np.full(len(data.X), -1)
        for k, idx in enumerate(data.parts):
            client[idx] = k
        table = {"cell": data.cells} | ({} if data.barcodes is None else {"barcode": data.barcodes})
        table["client"] = client
        if data.y is not None:
            table["label"] = data.y
            if data.label_names is not None:
                table["label_name"] = data.label_names[data.y]
        table["cluster"] = pred
        D.write_atomic(os.path.join(run_dir, "clusters.csv"), lambda tmp: pd.DataFrame(table).to_csv(tmp, index=False))
    if log:
        D.write_atomic(os.path.join(run_dir, "rounds.csv"), lambda tmp: pd.DataFrame(log).to_csv(tmp, index=False))
    if pred is not None and getattr(args, "sites", None):  # each site gets its own cells back, annotated
        key = args.method.lower()
        for k, (site, idx) in enumerate(zip(args.sites, data.parts)):
            names = data.cells[idx].astype(str) if data.barcodes is None else data.barcodes[idx]
            columns = {f"{key}_cluster": pred[idx]} | ({} if data.y is None else {"cell_type": data.label_names[data.y[idx]]})
            D.write_h5ad(os.path.join(run_dir, f"site{k}_{os.path.basename(site).split('.')[0]}.h5ad"),
                         data.X[idx], names, getattr(data, "genes", np.arange(data.X.shape[1])).astype(str), columns,
                         {f"X_{key}": h[idx].astype(np.float32)}, {f"{key}_config": json.dumps(vars(args))})
    metrics = metrics or {}
    traces = {}  # per-round means of what the method logs per client (FedSC: mu and div), in the row
    if log:
        frame = pd.DataFrame(log)
        for k in sorted(set(frame.columns) - {"round", "client", "lr", "loss"}):
            traces[f"{k}_by_round"] = " ".join(f"{v:.4g}" for v in frame.groupby("round")[k].mean())
    hvg = None if data.hvg is None else hashlib.sha256(np.asarray(data.hvg, np.int64).tobytes()).hexdigest()[:12]
    row = {**vars(args), **metrics, **traces, "genes_sha": hvg, "collapsed": h is not None and collapsed(h, metrics["erank"]), "status": status,
           "seconds": round(time.time() - data.t_start, 2), "torch": torch.__version__,
           "commit": git_commit(),
           "config_id": config_id(args), "run": os.path.basename(run_dir)}
    D.write_atomic(os.path.join(run_dir, "result.json"), lambda tmp: json.dump(row, open(tmp, "w"), indent=1))
    append_row(args.out, row)
    print(f"wrote a row to {args.out} and the run's files to {run_dir}", flush=True)
    return metrics


def config_id(args):
    """A hash of everything that can change a result: every argument (not where the row goes, not
    the thread count), the data file's sha256 and the code hash."""
    keep = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "threads")}
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]
