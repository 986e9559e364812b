"""The command line of every script: the options (dataclasses whose field docstrings become the
--help text), --recipe tuned, every input check that needs no data, and how errors end a run.
Support code, not the lesson: a method file's `Args(common.FedArgs)` and `common.parse_args`
come from here.

    DataArgs, FedArgs        the options every script shares; FedArgs' defaults are the paper's
    parse_args, tuned_recipe argparse from a dataclass; --recipe tuned reads recipes.json
    check, check_args, check_out, resolve   checks before anything is read; dataset defaults
    check_data               checks that need the loaded cells (before any training)
    user_errors, Diverged    one `error:` line and exit 2; a diverged run exits 3; Ctrl-C exits 130
"""
import contextlib
import os
import signal
import sys
import threading


def interrupted_line():
    saved = getattr(sys.modules.get("runs"), "saved", None)  # the run this process saved whole, if any
    return f"interrupted: {f'the run was saved whole in {saved}' if saved else 'nothing saved'}"


def end_now(signum, frame):
    """Ctrl-C or SIGTERM where a KeyboardInterrupt cannot unwind cleanly: while numpy, pandas and torch
    load (inside torch's import it would abort with a C++ message), and at exit (during torch's own exit
    callbacks, common.py): one line, exit 130. The line goes straight to file descriptor 2: as the
    interpreter shuts down, sys.stderr may be gone already."""
    with contextlib.suppress(OSError):
        os.write(2, (interrupted_line() + "\n").encode())
    os._exit(130)


MAIN_THREAD = threading.current_thread() is threading.main_thread()
SIGINT_BEFORE, SIGTERM_BEFORE = ((signal.signal(signal.SIGINT, end_now),
                                  signal.signal(signal.SIGTERM, end_now)) if MAIN_THREAD
                                 else (None, None))  # common.py puts them back once torch is loaded

import argparse  # noqa: E402 (after the handlers: a Ctrl-C from the first import on ends with one line)
import ast  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import typing  # noqa: E402

import numpy as np  # noqa: E402
from dataclasses import dataclass

import data as D
import formats
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
    """a separate labels file, one label per line (for CSV/TSV counts, 10x folders); with several columns the last; exactly one label per cell"""
    labels_header: bool = False
    """the --labels file's first line is a header, not a label. Without this flag every line is a label, except a first line that obviously is not one: a column name (label, cell_type, cluster, x, ...) or text above integer codes, found nowhere else in the file. A blank or NA line before the end is a missing label; one label per cell or the run is refused"""
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
    anchor: float = 0.0
    """weight of the PCA anchor (0 = off): a linear head on each cell's f(x) also regresses the cell's coordinates in the exact federated PCA-50 of all sites (sites send sums, fedpca.py), axes every site shares; the head is averaged like the encoder (docs/protocol.md#the-pca-anchor)"""
    one_pass: bool = False
    """both masked views of a batch through each network in one forward pass of 2B cells (faster: docs/speed.md); BatchNorm then normalises the two views together, not each view's B cells (not the paper: docs/protocol.md#one-pass)"""
    evaluate: typing.Literal["pooled", "federated", "both"] = "pooled"
    """pooled: KMeans and metrics on every cell's embedding in one place (the paper); federated: each site embeds its own cells, KMeans and ARI/NMI/CH from per-site sums, silhouette simplified (centroid-based); cells on no client are not evaluated; both: pooled, plus the federated metrics as fed_* columns (a simulation's comparison)"""


@functools.lru_cache(maxsize=None)
def _field_docs(cls):
    """Docstrings written under dataclass fields (the cleanrl/tyro convention); read once per class."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass).lstrip()).body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = b.value.value
    return docs


class Parser(argparse.ArgumentParser):
    """argparse whose errors end like every other input problem: one `error:` line, exit code 2."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def _parser(cls, with_defaults=True):
    docs = _field_docs(cls)
    p = Parser(description=(cls.__doc__ or "").strip(), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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


SITES_IGNORE = ("data", "labels", "clients", "partition", "types_per_client", "dirichlet_alpha", "shuffle_classes")
TRAINING = ("rounds", "local_epochs", "batch_size", "lr", "momentum", "weight_decay", "lr_schedule", "mask_rate",
            "eval_every", "l2norm")
UNUSED = [(lambda a: getattr(a, "sites", None), SITES_IGNORE, "--sites makes one client of each file"),
          (lambda a: getattr(a, "partition", "class") != "class", ("types_per_client", "shuffle_classes"),
           "types per client belong to --partition class"),
          (lambda a: getattr(a, "partition", "dirichlet") != "dirichlet", ("dirichlet_alpha",),
           "--dirichlet-alpha belongs to --partition dirichlet"),
          (lambda a: getattr(a, "method", "") == "FedPCA", TRAINING, "FedPCA trains nothing"),
          (lambda a: getattr(a, "baseline", "csc") != "csc", ("epochs", "csc_lr", "csc_batch"),
           "these options belong to --baseline csc"),
          (lambda a: getattr(a, "baseline", "pca") != "pca", ("n_components",),
           "--n-components belongs to --baseline pca"),
          (lambda a: getattr(a, "no_ema", False), ("tau", "tau_schedule"), "--no-ema leaves no target to average"),
          (lambda a: getattr(a, "no_predictor", False), ("predictor",), "--no-predictor leaves no predictor")]
# (when, options then unused, why)
RECORDED_WHEN_GIVEN = ("labels_header",)  # options newer than the results: rows of runs without them still match


def ignored(args, given):
    """[(flags, why)]: for each UNUSED rule that holds for args, the options among `given` it makes unused."""
    return [(flags, why) for when, keys, why in UNUSED
            if when(args) and (flags := [f"--{k.replace('_', '-')}" for k in keys if k in given])]


def parse_args(cls, argv=None):
    """The dataclass from the command line. With --recipe tuned, the method's tuned values from
    recipes.json replace the defaults of the options they name, unless given explicitly. Options
    that other options make meaningless (UNUSED: --sites, the partition, the baseline) are refused."""
    given_twice = [a for a in (sys.argv[1:] if argv is None else argv) if a.split("=")[0] == "--sites"][1:]
    check(not given_twice, "--sites is given twice: the second list would silently replace the first; "
                           "give every site file after one --sites")
    args = cls(**vars(_parser(cls).parse_args(argv)))
    args.method = args.method  # a derived field: an attribute of the instance, so rows record it
    given = vars(_parser(cls, with_defaults=False).parse_args(argv))
    for k in RECORDED_WHEN_GIVEN:
        if k not in given:
            vars(args).pop(k, None)  # the class default still answers args.<k>
    for flags, why in ignored(args, given):
        check(False, f"{why}, so {', '.join(flags)} would be ignored (and recorded as if used): "
                     f"drop {'it' if len(flags) == 1 else 'them'}")
    if getattr(args, "recipe", "paper") == "tuned":
        recipe = tuned_recipe(args.method)
        for k, v in recipe.items():
            if k not in given:
                setattr(args, k, type(getattr(args, k))(v))
    return args


def tuned_recipe(method):
    if not os.path.exists(RECIPES):
        raise D.DataError(f"--recipe tuned needs {os.path.basename(RECIPES)}: run `bash run_all.sh tune` first")
    try:
        with open(RECIPES) as f:
            recipes = json.load(f)["recipes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise D.DataError(f"{os.path.basename(RECIPES)} is not readable ({type(e).__name__}: {e}): run `bash run_all.sh tune`") from None
    if method not in recipes:
        raise D.DataError(f"{os.path.basename(RECIPES)} has no tuned recipe for {method}: run `bash run_all.sh tune`")
    return recipes[method]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def user_errors(script=True):
    """A script's main block. Input problems end the run with one `error:` line and exit code 2 (no
    traceback, no row); a diverged training run ends with one `diverged:` line and exit code 3 (its
    row says so); Ctrl-C or SIGTERM ends it with one `interrupted:` line and exit code 130, leaving a
    whole run (folder and row) or nothing (runs.save_run), also after the block as the process exits
    (script=False: the handlers from before are back, for code that goes on, such as a test)."""
    main = threading.current_thread() is threading.main_thread()
    term = signal.signal(signal.SIGTERM, _interrupt) if main else None
    line = lambda e: " ".join(l.strip() for l in str(e).splitlines() if l.strip())  # a library's message may span lines
    try:
        yield
    except D.DataError as e:
        print(f"error: {line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Diverged as e:
        print(f"diverged: {line(e)}", file=sys.stderr, flush=True)
        sys.exit(3)
    except KeyboardInterrupt:
        _interrupted()
    finally:
        if main:
            try:
                signal.signal(signal.SIGTERM, term)
                if script:  # the script ends: a signal during torch's exit callbacks ends with one line too
                    signal.signal(signal.SIGINT, end_now)
                    signal.signal(signal.SIGTERM, end_now)
            except KeyboardInterrupt:  # a Ctrl-C as the script ends, once the run is saved or not
                _interrupted()


def _interrupted():
    print(interrupted_line(), file=sys.stderr, flush=True)
    sys.exit(130)


def check(ok, msg):
    """An input check: raise the one-line user error msg unless ok."""
    if not ok:
        raise D.DataError(msg)


def check_args(args):
    """Every argument that can be checked without the data, before anything is read or trained
    (a method's own arguments are checked by its Args.__post_init__; here, that each is finite)."""
    need = check
    for f in dataclasses.fields(args):
        if f.type is float:
            need(math.isfinite(getattr(args, f.name)), f"--{f.name.replace('_', '-')} must be a finite number, got {getattr(args, f.name)}")
    if isinstance(args, FedArgs) and args.threads == 0:  # every core this process may use
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for name in ("threads",) + (("clients", "rounds", "local_epochs") if isinstance(args, FedArgs) else ()):
        need(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    need(0 <= args.seed < 2 ** 32, f"--seed must be in [0, 2^32), got {args.seed}")
    need(args.n_genes >= 0, f"--n-genes must be positive (or 0 for the default), got {args.n_genes}")
    need(args.n_clusters == 0 or args.n_clusters >= 2, f"--n-clusters must be at least 2 (or 0 = number of types), got {args.n_clusters}")
    need(not (args.labels and args.label_key), "--labels and --label-key both give the labels: give one")
    need(args.labels or not args.labels_header, "--labels-header is about a --labels file: give one, or drop it")
    if args.labels:
        formats.check_path(args.labels, "--labels")
        args.labels = formats.Labels(args.labels, args.labels_header)  # read_labels applies the header rule
    if isinstance(args, FedArgs):
        if args.sites:
            args.clients = len(args.sites)  # one client per site file
        need(args.batch_size >= 2, f"--batch-size must be at least 2 (BatchNorm needs two cells), got {args.batch_size}")
        need(0 <= args.mask_rate < 1, f"--mask-rate must be in [0, 1), got {args.mask_rate}")
        need(args.lr > 0, f"--lr must be positive, got {args.lr}")
        need(args.types_per_client >= 0, f"--types-per-client must be at least 1 (or 0 = the default), got {args.types_per_client}")
        need(args.dirichlet_alpha >= 0.01, f"--dirichlet-alpha must be positive and at least 0.01 (below, numpy's "
                                           f"Dirichlet draws underflow to NaN and the split would silently be uniform), got {args.dirichlet_alpha}")
        need(args.eval_every >= 0, f"--eval-every must be 0 (off) or more, got {args.eval_every}")
        need(0 <= args.momentum < 1, f"--momentum must be in [0, 1), got {args.momentum}")
        need(args.anchor >= 0, f"--anchor must be 0 (off) or positive, got {args.anchor}")
        need(args.weight_decay >= 0, f"--weight-decay must be 0 or more, got {args.weight_decay}")
    check_out(args.out)


def check_out(out):
    """--out must be a results CSV that append_row can read (with pandas, as it does) and replace, or
    a new or empty file, in a folder we can write to, beside a run folder (runs/) we can create."""
    if not os.path.basename(out):
        raise D.DataError(f"--out '{out}' names no file; give a CSV file path such as runs/results.csv")
    formats.check_path_length(out, "--out", room=300)  # its temporary name, lock file and run folder fit too
    if os.path.isdir(out):
        raise D.DataError(f"--out '{out}' is a directory; give a CSV file path, e.g. {os.path.join(out, 'results.csv')}")
    if os.path.lexists(out) and not os.path.isfile(out):
        raise D.DataError(f"--out '{out}' exists and is not a regular file (a link to nothing, a FIFO or a device); "
                          f"give a CSV file path")
    columns = runs.read_rows(out).columns  # unreadable or unparseable: refused now, not after training
    if len(columns) and "config_id" not in columns:
        raise D.DataError(f"--out '{out}' exists and is not a results CSV of these scripts; "
                          f"choose another file (rows are appended, never overwritten)")
    folder, run_dir = os.path.dirname(os.path.realpath(out)), runs.runs_dir(out)
    for what, path, kind in (("--out", folder, "folder"), ("its run folder", run_dir, "folder"),
                             ("its lock file", os.path.realpath(out) + ".lock", "file")):
        if os.path.lexists(path) and not (os.path.isdir(path) if kind == "folder" else os.path.isfile(path)):
            raise D.DataError(f"--out '{out}': {what} {path} exists and is not a {kind}; move it away or choose another --out")
    parent = folder  # the folders are made when the run is saved; here, only where they would be
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    try:
        for where in {parent, run_dir if os.path.isdir(run_dir) else parent}:
            if not os.path.isdir(where):
                raise NotADirectoryError(20, "not a folder", where)
            with tempfile.NamedTemporaryFile(dir=where):
                pass
    except OSError as e:
        raise D.DataError(f"--out '{out}': cannot write to {e.filename or folder} ({e.strerror or e})") from None


_SHA256 = {}  # (path, size, mtime): sha256, so a benchmark resolving hundreds of runs reads each file once


def file_sha256(path):
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = D.sha256sum(path)
    return _SHA256[key]


def check_benchmark(name, digest, what):
    """A benchmark given by name must be that very file (sha256); any other name passes."""
    named = D.BENCHMARKS.get(str(name), {}).get("sha256", digest)
    check(digest == named, f"--data {name}: {what} is not the benchmark's file (sha256 {digest[:12]}..., "
                           f"expected {named[:12]}...); put the benchmark's own file there, or pass this one by its path")


def benchmark_defaults(args, digest):
    """The data's sha256 in the row; a benchmark's file (by name or path) brings its --n-genes and
    --types-per-client where they are 0."""
    bench = next((b for b in D.BENCHMARKS.values() if b["sha256"] == digest), {})
    args.n_genes = args.n_genes or bench.get("n_genes", D.DEFAULT_N_GENES)
    if isinstance(args, FedArgs) and not args.types_per_client and "types_per_client" in bench:
        args.types_per_client = bench["types_per_client"]
    args.data_sha256 = digest[:16]


def resolve(args, script=None):
    """Fill in what a run's row must record: dataset defaults (0 = the benchmark's value; a
    benchmark given by path is recognised by its sha256), the data file's sha256 and the code hash."""
    if getattr(args, "sites", None):  # the sites' files, in order
        for k, site in enumerate(args.sites):
            check(os.path.exists(site), f"site {k} ('{site}'): the file does not exist")
            formats.check_path(site, f"site {k}")
        digests = [file_sha256(s) for s in args.sites]
        for k, d in enumerate(digests):
            j = digests.index(d)
            check(j == k, f"site {k} ('{args.sites[k]}') is the same {'file' if os.path.samefile(args.sites[j], args.sites[k]) else 'data'} "
                          f"as site {j} ('{args.sites[j]}'): give each site's file once")
        digest = hashlib.sha256("".join(digests).encode()).hexdigest()
    else:
        path = D.resolve_data(args.data)
        formats.check_path(path, "--data")
        digest = file_sha256(path)
        check_benchmark(args.data, digest, f"'{path}'")
    benchmark_defaults(args, digest)
    args.code = runs.code_hash(script or sys.modules[type(args).__module__].__file__)  # the method's file
    return args


def default_types_per_client(args, y):
    """--types-per-client 0 on other data than the benchmarks: floor(types / clients)."""
    if args.partition == "class" and y is not None and not args.types_per_client:
        args.types_per_client = max(1, len(np.unique(y)) // args.clients)
        print(f"types per client: {args.types_per_client} (floor of {len(np.unique(y))} types / {args.clients} clients)")


def check_data(args, data):
    """What needs the loaded cells, before any training: at least two clusters and no more than the
    cells, and a MoCo queue not far above the cell count (it would hold mostly random starting keys)."""
    n, k = len(data.X), data.n_clusters
    check(k >= 2, f"the data have a single cell type ('{data.label_names[0] if data.label_names is not None else '?'}'): "
                  f"one cluster says nothing (ARI would be 100); give data with several types or --n-clusters K")
    check(k < n, f"--n-clusters {k}: clustering needs fewer clusters than the {n} cells")
    if data.y is not None:  # a cell type is shared by cells; a count or a barcode is not
        alone = int((np.bincount(data.y) == 1).sum())
        check(alone <= n / 2, f"{alone} of the {n} cells have a label that no other cell has: these labels look like "
                              f"a per-cell value (a count, a barcode), not cell types; choose another --label-key or --labels")
    queue = getattr(args, "queue_size", None)
    most = max(n, type(args).__dataclass_fields__["queue_size"].default) if queue else 0
    check(not queue or queue <= most, f"--queue-size {queue} is far above the {n} cells: a client's queue would hold "
                                      f"mostly its random starting keys; use at most {most}")
