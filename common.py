"""Shared training and evaluation helpers for the method files (fedsc.py, fedbyol.py, ...).

Only infrastructure lives here; every method file keeps its networks, its loss, what its clients
upload and how they take the global model back. In reading order:

    FedArgs, parse_args   the common command-line arguments (one dataclass, argparse, no extras)
    setup                 threads, seeding, config print, data loading and the client partition
    backbone, mask        the contrastive-sc encoder f and random masking
    fedavg                the server's weighted average
    federate              rounds x clients x local epochs, with the method's hooks
    evaluate, finish      KMeans on the global encoder's embedding, metrics, results
"""
import ast
import argparse
import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import inspect
import json
import math
import os
import random
import sys
import time
import typing
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data as D


# ---------------------------------------------------------------------------------------------
# Arguments: a dataclass whose field docstrings become the --help text
# ---------------------------------------------------------------------------------------------
@dataclass
class FedArgs:
    data: str = "10X_PBMC"
    """benchmark name (10X_PBMC or mouse_bladder, read from $FEDSC_DATA_DIR, default ./data, and downloaded if absent) or a path to an .h5/.h5ad/.csv/.tsv file"""
    seed: int = 0
    """seed of python, numpy and torch (model init, client partition, batches, masks)"""
    clients: int = 4
    """number of clients K, all taking part in every round"""
    partition: typing.Literal["class", "iid", "dirichlet"] = "class"
    """how cells are split over clients: c cell types per client (EasyFL non_iid_class), iid, or dirichlet"""
    types_per_client: int = 0
    """cell types per client for --partition class; 0 = the paper's value (PBMC 2, bladder 4, other data 2)"""
    rounds: int = 300
    """communication rounds R"""
    local_epochs: int = 5
    """local epochs E per round"""
    batch_size: int = 128
    """batch size B (a client with fewer cells trains on one batch of all its cells)"""
    lr: float = 0.032
    """base learning rate of local SGD"""
    threads: int = 1
    """torch (and KMeans) threads; a second thread barely speeds up this small MLP (results/speed.md), so one run per core is the better use of 2 cores"""
    out: str = "results/runs.csv"
    """CSV file that gets one row per finished run; embedding and clusters go to <its folder>/runs/<run name>/"""
    momentum: float = 0.5
    """SGD momentum (paper 0.5; EasyFL 0.9)"""
    weight_decay: float = 5e-4
    """SGD weight decay"""
    lr_schedule: typing.Literal["cosine", "constant"] = "cosine"
    """per-round learning rate: cosine from lr to 0 over the rounds (EasyFL default), or constant"""
    mask_rate: float = 0.9
    """random masking rate p of each augmented view (contrastive-sc input dropout 0.9)"""
    n_genes: int = 0
    """highly variable genes kept; 0 = 500 for PBMC, 1500 for bladder, 500 for other data"""
    dirichlet_alpha: float = 0.5
    """concentration of --partition dirichlet (smaller = more skewed)"""
    shuffle_classes: bool = False
    """--partition class: permute the class ids (seeded) before the heap assignment"""
    label_key: str = ""
    """.h5ad obs column (or HDF5 dataset) with the cell types; scDeepCluster files use Y"""
    labels: str = ""
    """a separate labels file, one label per line (for CSV/TSV counts)"""
    transpose: bool = False
    """CSV/TSV counts have genes as rows and cells as columns"""
    n_clusters: int = 0
    """KMeans clusters; 0 = number of true cell types (needed when the data has no labels)"""
    eval_every: int = 0
    """also cluster and print ARI every N rounds (0 = only at the end)"""
    l2norm: bool = True
    """L2-normalise the embedding before KMeans (contrastive-sc does)"""
    embed: typing.Literal["backbone", "head"] = "backbone"
    """cluster the 60-d backbone output, or the 128-d head output"""


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


def parse_args(cls, argv=None):
    docs = _field_docs(cls)
    p = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        kw = dict(default=f.default, help=docs.get(f.name, " "))
        if f.type is bool:  # False by default: a plain switch; True by default: --x / --no-x
            kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        elif typing.get_origin(f.type) is typing.Literal:
            kw.update(choices=typing.get_args(f.type), type=type(typing.get_args(f.type)[0]))
        else:
            kw["type"] = f.type
        p.add_argument(*names, dest=f.name, **kw)
    return cls(**vars(p.parse_args(argv)))


@contextlib.contextmanager
def user_errors():
    """Input problems end the run with one line and exit code 2, no traceback, no results row."""
    try:
        yield
    except D.DataError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Setup: threads, seeds, config, data and partition
# ---------------------------------------------------------------------------------------------
@dataclass
class Data:
    X: np.ndarray            # preprocessed cells x genes (all cells; used for evaluation only)
    y: typing.Optional[np.ndarray]
    parts: list              # one index array per client
    n_clusters: int
    cells: np.ndarray        # row numbers of the kept cells in the input file


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_args(args):
    for name in ("clients", "rounds", "local_epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise D.DataError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.mask_rate < 1:
        raise D.DataError(f"--mask-rate must be in [0, 1), got {args.mask_rate}")
    if args.lr <= 0:
        raise D.DataError(f"--lr must be positive, got {args.lr}")


def resolve(args, method):
    """Fill in the method name and the dataset-dependent defaults (0 = the paper's value)."""
    args.method = method
    bench = D.BENCHMARKS.get(args.data, {})
    args.n_genes = args.n_genes or bench.get("n_genes", D.DEFAULT_N_GENES)
    args.types_per_client = args.types_per_client or bench.get("types_per_client", D.DEFAULT_TYPES_PER_CLIENT)
    return args


def load(args):
    """Read and preprocess the data; returns (X, labels, n_clusters, kept cells, raw counts)."""
    path = D.resolve_data(args.data)
    counts, y = D.read_counts(path, args.label_key or None, args.labels or None, args.transpose)
    X, cells, genes = D.preprocess(counts, args.n_genes)
    y = None if y is None else y[cells]
    if y is None and args.n_clusters < 1:
        raise D.DataError(f"'{path}' has no cell-type labels: pass --n-clusters to choose k "
                          f"(only the label-free metrics will be reported)")
    print(f"data {path}: {len(X)} cells x {X.shape[1]} genes, "
          f"{'no labels' if y is None else f'{len(np.unique(y))} types'}", flush=True)
    return X, y, args.n_clusters or len(np.unique(y)), cells, counts[cells]


def setup(args, method):
    """Print the resolved config, seed everything, load + preprocess + partition the data."""
    resolve(args, method)
    check_args(args)
    torch.set_num_threads(args.threads)
    print(f"config {json.dumps(vars(args))}", flush=True)
    print(f"torch {torch.__version__}  threads {torch.get_num_threads()}", flush=True)
    seed_everything(args.seed)
    X, y, n_clusters, cells, _ = load(args)
    if len(X) < args.clients:
        raise D.DataError(f"{len(X)} cells for {args.clients} clients; use fewer --clients")
    parts = D.partition(y, args.clients, args.partition, args.types_per_client,
                        args.dirichlet_alpha, args.seed, args.shuffle_classes, n_cells=len(X))
    for k, idx in enumerate(parts):
        types = "" if y is None else f"  types {sorted(set(y[idx].tolist()))}"
        print(f"client {k}: {len(idx)} cells{types}", flush=True)
    unused = len(X) - len(np.unique(np.concatenate(parts)))
    if unused:
        print(f"{unused} cells belong to no client (not trained on; still evaluated)", flush=True)
    return Data(X, y, parts, n_clusters, cells)


# ---------------------------------------------------------------------------------------------
# Shared networks and augmentation
# ---------------------------------------------------------------------------------------------
def backbone(n_genes, dims=(200, 40, 60)):
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


def mask(x, p, gen):
    """Random masking: each gene of each cell zeroed with probability p, the rest scaled by 1/(1-p)
    (inverted dropout, as contrastive-sc's nn.Dropout); scaled data, so 0 is the gene's mean."""
    if p == 0:
        return x
    keep = torch.rand(x.shape, generator=gen) >= p
    return x * keep / (1 - p)


# ---------------------------------------------------------------------------------------------
# Server aggregation
# ---------------------------------------------------------------------------------------------
def fedavg(states, weights):
    """FedAvg: sum_k (N_k / N) W_k over every floating-point entry (BN running stats included);
    integer entries (BN num_batches_tracked) are taken from the first client."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = sum(wk * s[key].double() for wk, s in zip(w, states)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


# ---------------------------------------------------------------------------------------------
# The federation loop
# ---------------------------------------------------------------------------------------------
@dataclass
class Client:
    cid: int
    x: torch.Tensor          # this client's cells: private, they never leave the client
    model: nn.ModuleDict     # the client's copy of every module (uploaded or kept local)
    state: dict              # method-local state (FedSC's lambda, MoCo's queue ...), never uploaded

    @property
    def n(self):
        return len(self.x)


def learning_rate(args, rnd):
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


def federate(args, data, model, upload, download, loss_fn, trainable, after_step=None):
    """Run args.rounds rounds. Hooks from the method file:
      upload:      names of the modules a client sends (with its cell count) to the server
      download(client, global_state, rnd, args) -> dict of numbers to log: take the global model back
      loss_fn(model, v1, v2, client, args) -> scalar loss on two masked views of a batch
      trainable(model, args) -> parameters the local optimizer updates
      after_step(model, client, step, args): per-step update, e.g. a target EMA (or None)
    Returns the server's model (its uploaded modules hold the final global weights)."""
    gen = torch.Generator().manual_seed(args.seed)
    X = torch.from_numpy(data.X)
    # CLIENT SIDE: each client holds its own cells and its own copy of the model
    clients = [Client(k, X[idx].clone(), copy.deepcopy(model), {}) for k, idx in enumerate(data.parts)]
    # SERVER SIDE: the global weights of the uploaded modules, nothing else
    global_state = {key: copy.deepcopy(model[key].state_dict()) for key in upload}
    step, t_start = 0, time.time()
    for rnd in range(args.rounds):
        t0, lr = time.time(), learning_rate(args, rnd)
        uploads, losses, logs = [], [], []
        for c in clients:
            # ---- on client c: download, local epochs, upload ----------------------------------
            logs.append(download(c, global_state, rnd, args) or {})
            opt = torch.optim.SGD(trainable(c.model, args), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
            c.model.train()
            for _ in range(args.local_epochs):
                for idx in batches(c.n, args.batch_size, gen):
                    xb = c.x[idx]
                    v1, v2 = mask(xb, args.mask_rate, gen), mask(xb, args.mask_rate, gen)
                    loss = loss_fn(c.model, v1, v2, c, args)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if after_step:
                        after_step(c.model, c, step, args)
                    step += 1
                    losses.append(loss.detach())
            # what crosses the wire: copies of the uploaded modules' weights and the cell count
            uploads.append(({key: {k: v.detach().clone() for k, v in c.model[key].state_dict().items()}
                             for key in upload}, c.n))
        # ---- on the server: FedAvg of each uploaded module, weighted by cell counts ---------------
        states, counts = zip(*uploads)
        global_state = {key: fedavg([s[key] for s in states], counts) for key in upload}
        # ---- progress ---------------------------------------------------------------------------
        extra = "".join(f"  {k} {np.mean([l[k] for l in logs if k in l]):.3f}"
                        for k in sorted({k for l in logs for k in l}))
        loss = torch.stack(losses).mean().item() if losses else float("nan")
        if not math.isfinite(loss):
            print(f"warning: round {rnd + 1} loss is {loss}: training diverged (try a smaller --lr)", flush=True)
        line = f"round {rnd + 1}/{args.rounds}  loss {loss:.4f}  lr {lr:.4f}{extra}  {time.time() - t0:.2f}s"
        if args.eval_every and (rnd + 1) % args.eval_every == 0 and rnd + 1 < args.rounds:
            for key in upload:
                model[key].load_state_dict(global_state[key])
            m = evaluate(args, data, model)
            line += f"  ARI {m['ari']:.2f}" if "ari" in m else f"  sil {m['sil']:.2f}"
        print(line, flush=True)
    for key in upload:
        model[key].load_state_dict(global_state[key])
    print(f"trained {args.rounds} rounds in {time.time() - t_start:.1f}s ({step} local steps)", flush=True)
    return model


# ---------------------------------------------------------------------------------------------
# Evaluation and results
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def embed(args, model, X):
    """All cells through the global online encoder (MoCo: encoder_q), eval mode, unmasked."""
    enc = model["online"]
    enc.eval()
    h = (enc.f if args.embed == "backbone" else enc)(torch.from_numpy(X))
    enc.train()
    if args.l2norm:
        h = F.normalize(h, dim=1)
    return h.numpy().astype(np.float64)


def cluster_metrics(h, y, n_clusters, seed, threads=1):
    """KMeans(k-means++, n_init=10, random_state=seed); ARI and NMI against y when given,
    silhouette (on the embedding, predicted labels; 5000-cell sample above that) and
    Calinski-Harabasz. ARI/NMI/silhouette in percent, as the paper's tables."""
    from sklearn.cluster import KMeans
    from sklearn import metrics as M
    from threadpoolctl import threadpool_limits
    if not np.isfinite(h).all():
        raise D.DataError("the embedding holds NaN or inf values: training diverged; try a smaller --lr")
    with threadpool_limits(threads):
        pred = KMeans(n_clusters=n_clusters, init="k-means++", n_init=10, random_state=seed).fit_predict(h)
    out = {}
    if y is not None:
        out["ari"] = 100 * M.adjusted_rand_score(y, pred)
        out["nmi"] = 100 * M.normalized_mutual_info_score(y, pred)
    if len(np.unique(pred)) > 1:
        sample = 5000 if len(h) > 5000 else None
        out["sil"] = 100 * M.silhouette_score(h, pred, sample_size=sample, random_state=seed)
        out["ch"] = M.calinski_harabasz_score(h, pred)
    else:
        print("warning: every cell got the same cluster: the embedding has collapsed", flush=True)
        out["sil"] = out["ch"] = float("nan")
    return out, pred


def evaluate(args, data, model):
    return cluster_metrics(embed(args, model, data.X), data.y, data.n_clusters, args.seed, args.threads)[0]


def config_id(args):
    """A hash of every argument that can change the result (not where it is written, not threads)."""
    keep = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "threads")}
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def append_row(path, row):
    """Append one row to a CSV under a lock, by writing a new file and renaming it over the old:
    an interrupted or parallel run never leaves a half-written row."""
    import pandas as pd
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = pd.read_csv(path) if os.path.exists(path) else pd.DataFrame()
        new = pd.concat([old, pd.DataFrame([row])], ignore_index=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        new.to_csv(tmp, index=False)
        os.replace(tmp, path)


def finish(args, data, model, t_start, h=None):
    """Cluster the final global encoder's embedding (or a given one, h), save the embedding and the
    clusters, and append the results row."""
    h = embed(args, model, data.X) if h is None else h
    metrics, pred = cluster_metrics(h, data.y, data.n_clusters, args.seed, args.threads)
    seconds = time.time() - t_start
    print("final  " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()) + f"  time {seconds:.1f}s", flush=True)
    name = f"{os.path.basename(str(args.data)).split('.')[0]}__{args.method}__s{args.seed}__{int(time.time())}"
    run_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "runs", name)
    os.makedirs(run_dir, exist_ok=True)
    np.save(os.path.join(run_dir, "embedding.npy"), h.astype(np.float32))
    client = np.full(len(data.X), -1)
    for k, idx in enumerate(data.parts):
        client[idx] = k
    import pandas as pd
    pd.DataFrame({"cell": data.cells, "client": client,
                  "label": data.y if data.y is not None else -1, "cluster": pred}
                 ).to_csv(os.path.join(run_dir, "clusters.csv"), index=False)
    row = {**vars(args), **metrics, "seconds": round(seconds, 2), "torch": torch.__version__,
           "threads_used": torch.get_num_threads(), "config_id": config_id(args), "run": name}
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump(row, f, indent=1)
    append_row(args.out, row)
    print(f"wrote a row to {args.out} and the embedding to {run_dir}", flush=True)
    return metrics
