"""The command line of every script: the options (dataclasses whose field docstrings become the
--help text), --recipe tuned, every input check that needs no data, and how errors end a run.
Support code, not the lesson: a method file's `Args(common.FedArgs)` and `common.parse_args`
come from here.

    DataArgs, FedArgs        the options every script shares; FedArgs' defaults are the paper's
    parse_args, tuned_recipe argparse from a dataclass; --recipe tuned reads recipes.json
    check, check_args, check_out, resolve   checks before anything is read; dataset defaults
    user_errors, Diverged    one `error:` line and exit 2; a diverged run exits 3
"""
import argparse
import ast
import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import sys
import tempfile
import typing

import numpy as np
from dataclasses import dataclass

import data as D
import runs

ROOT = os.path.dirname(os.path.abspath(__file__))
RECIPES = os.path.join(ROOT, "recipes.json")  # --recipe tuned values, written by run_all.sh tune


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
    """torch threads (centralized.py; a federated script trains this many clients of a round at once instead)"""
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
    """The federated protocol; defaults are the paper's (docs/protocol.md)."""
    threads: int = 0
    """clients of a round trained at once, one core and one torch thread each (the same result as one at a time); 0 = every available core"""
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
    """BatchNorm statistics of the global encoder when it embeds the cells: running = the clients' running statistics averaged by FedAvg (the paper); recompute = recomputed from the cells of every site (sites send per-feature sums; docs/protocol.md: deviation 12)"""
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


def check(ok, msg):
    """An input check: raise the one-line user error msg unless ok."""
    if not ok:
        raise D.DataError(msg)


def check_args(args):
    """Every argument that can be checked without the data, before anything is read or trained
    (a method's own arguments are checked by its Args.__post_init__)."""
    need = check
    if isinstance(args, FedArgs) and args.threads == 0:  # every core this process may use
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
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


_SHA256 = {}  # (path, size, mtime): sha256, so a benchmark resolving hundreds of runs reads each file once


def file_sha256(path):
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = D.sha256sum(path)
    return _SHA256[key]


def resolve(args, script=None):
    """Fill in what a run's row must record: dataset defaults (0 = the benchmark's value; a
    benchmark given by path is recognised by its sha256), the data file's sha256 and the code hash."""
    if getattr(args, "sites", None):  # the sites' files, in order
        for k, site in enumerate(args.sites):
            check(os.path.exists(site), f"site {k} ('{site}'): the file does not exist")
        digest = hashlib.sha256("".join(file_sha256(s) for s in args.sites).encode()).hexdigest()
    else:
        digest = file_sha256(D.resolve_data(args.data))
    bench = next((b for b in D.BENCHMARKS.values() if b["sha256"] == digest), {})
    args.n_genes = args.n_genes or bench.get("n_genes", D.DEFAULT_N_GENES)
    if isinstance(args, FedArgs) and not args.types_per_client and "types_per_client" in bench:
        args.types_per_client = bench["types_per_client"]
    args.data_sha256 = digest[:16]
    args.code = runs.code_hash(script or sys.modules[type(args).__module__].__file__)  # the method's file
    return args


def default_types_per_client(args, y):
    """--types-per-client 0 on other data than the benchmarks: floor(types / clients)."""
    if args.partition == "class" and y is not None and not args.types_per_client:
        args.types_per_client = max(1, len(np.unique(y)) // args.clients)
        print(f"types per client: {args.types_per_client} (floor of {len(np.unique(y))} types / {args.clients} clients)")
