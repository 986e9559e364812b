"""Shared infrastructure for the method files (fedsimclr.py, fedsimsiam.py, fedmoco.py, fedbyol.py,
fedsc.py) and centralized.py.

Only infrastructure lives here. Each method file keeps its networks, its loss, its local update,
what a client uploads, how the server aggregates and how a client takes the global model back;
`federate` below only calls those functions in order. In reading order:

    backbone, Encoder, two_views   the contrastive-sc encoder f, g(f(x)), random masking
    Client, batches, weights       a client's private state; shuffled batches; copies of weights
    fedavg                         the server's cell-weighted average
    federate                       rounds x clients: download -> local update -> upload; aggregate
    embed, cluster_metrics         the global encoder's embedding; KMeans and the metrics
    setup, finish                  a script's first and last step: data and clients; clusters and files

Support modules, not the lesson: cli.py (options and checks), runs.py (the run's files and results
row), federated.py (every step kept at the sites), formats.py (file formats).
"""
import cli  # first: a Ctrl-C while numpy and torch load then ends with one line
import concurrent.futures
import copy
import dataclasses
import json
import math
import random
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data as D
import runs
import federated
from cli import DataArgs, Diverged, FedArgs, check, parse_args, user_errors  # noqa: F401 (the command line: cli.py)
if cli.MAIN_THREAD:  # torch is loaded: the handlers from before again (user_errors() makes a signal one line)
    signal.signal(signal.SIGINT, cli.SIGINT_BEFORE or signal.default_int_handler)
    signal.signal(signal.SIGTERM, cli.SIGTERM_BEFORE or signal.SIG_DFL)

EMBED_DIM = 60    # backbone output f(x): what KMeans clusters (contrastive-sc's [200, 40, 60])
PROJ_DIM = 128    # head output g(f(x)) that the losses compare (the paper's 128-d predictor)
COLLAPSE_ERANK = 2.0  # an embedding (of more than 2 dimensions) with a lower effective rank has collapsed


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


def views(net, v1, v2, args):
    """net(v1), net(v2): each view's batch on its own (the paper), or with --one-pass both views in
    one forward pass of 2B cells (BatchNorm then normalises them together)."""
    if args.one_pass:
        return net(torch.cat([v1, v2])).chunk(2)
    return net(v1), net(v2)


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
    """target <- tau * target + (1 - tau) * online for every parameter (BN buffers untouched), in one
    foreach call: the same numbers as a loop of t.lerp_(o, 1 - tau), fewer kernel launches per step."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - tau)


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
    if args.anchor:  # --anchor: the head joins the server's model; each site's targets stay with it
        model["anchor"] = nn.Linear(EMBED_DIM, min(ANCHOR_DIMS, data.X.shape[1]))
    clients = [make_client(k, X[idx].clone(), model, args.seed) for k, idx in enumerate(data.parts)]
    if args.anchor:
        for c, target in zip(clients, anchor_targets([data.X[idx] for idx in data.parts])):
            c.state["anchor"] = target
    # SERVER SIDE: the global weights; round 0 broadcasts the seeded initial model
    global_state = {key: weights(module) for key, module in model.items()}

    def on_client(c, lr):  # ---- on client c: its cells and local state never leave it ---------
        if args.anchor:  # the anchor head goes and comes back as is (plain FedAvg), for every method
            c.model["anchor"].load_state_dict(global_state["anchor"])
        entry = download(c, global_state, args)
        entry.update(local_update(c, lr, args))
        sent, n = upload(c)
        if args.anchor:
            sent = {**sent, "anchor": weights(c.model["anchor"])}
        return (sent, n), entry

    # --threads N trains N clients at once (each client has its own RNG: same result as one by one)
    pool = concurrent.futures.ThreadPoolExecutor(args.threads) if args.threads > 1 else None
    log, t_start = [], time.time()
    for rnd in range(args.rounds):
        t0, lr = time.time(), learning_rate(args, rnd)
        todo = (clients, [lr] * len(clients))
        uploads, logs = zip(*(pool.map(on_client, *todo) if pool else map(on_client, *todo)))
        global_state = aggregate(uploads)  # ---- on the server: only weights and counts arrive --
        if args.anchor:
            global_state["anchor"] = fedavg([sent["anchor"] for sent, _ in uploads], [n for _, n in uploads])
        log += [{"round": rnd + 1, "client": c.cid, "lr": lr, **e} for c, e in zip(clients, logs)]
        loss = float(np.mean([e["loss"] for e in logs]))
        if not math.isfinite(loss):  # a result, not an input error: the row records it
            runs.save_run(args, data, log, "diverged")
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
                runs.save_run(args, data, log, "diverged")
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
# --anchor: axes every site shares. Under label skew no local loss tells types on different
# clients apart; the exact federated PCA (fedpca.py) gives every cell absolute coordinates, and a
# head on f(x) learns to reproduce them, so the averaged encoder keeps what separates all types.
# ---------------------------------------------------------------------------------------------
ANCHOR_DIMS = 50  # principal components the head regresses (as fedpca.py's default)


def anchor_targets(parts):
    """Each client's cells in the federated PCA, scaled so that their mean squared norm over all
    cells is 1. SITE -> SERVER: count, per-gene sums, gene x gene sums (fedpca.site_sums); the SERVER
    returns the mean and components; each SITE projects its own cells. parts: each site's cells."""
    import fedpca
    sent = [fedpca.site_sums(x) for x in parts]                        # on each SITE
    mean, comps, _ = fedpca.server_pca(sent, ANCHOR_DIMS)              # on the SERVER: sums only
    n, S = sum(s[0] for s in sent), sum(s[2] for s in sent)
    var = (np.trace(comps.T @ S @ comps) - n * np.sum((mean @ comps) ** 2)) / n  # mean squared norm
    return [torch.from_numpy(fedpca.site_project(x, mean, comps) / math.sqrt(var)).float() for x in parts]


def anchor_loss(model, x, target):
    """Squared error of the anchor head on the unit-length f(x) of unmasked cells x against their
    scaled PCA coordinates (1 for a head that predicts 0)."""
    h = F.normalize(model["online"].f(x), dim=1)
    return ((model["anchor"](h) - target) ** 2).sum(1).mean()


# ---------------------------------------------------------------------------------------------
# Evaluation: the global encoder's embedding, KMeans, metrics
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def embed(args, model, X, sites=None):
    """All cells through the global online encoder (MoCo: encoder_q), eval mode, unmasked. With
    --bn-stats recompute, a copy of the encoder first takes its BatchNorm statistics from sites
    (a list of cell matrices, one per site; default: every cell as one site)."""
    enc = model["online"]
    if getattr(args, "bn_stats", "running") == "recompute":
        enc = copy.deepcopy(enc)
        federated.recompute_bn(enc, [torch.from_numpy(X)] if sites is None else [torch.from_numpy(s) for s in sites])
    enc.eval()
    h = (enc.f if args.embed == "backbone" else enc)(torch.from_numpy(X))
    enc.train()
    if args.l2norm:
        h = F.normalize(h, dim=1)
    return h.numpy().astype(np.float64)


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


def effective_rank(h):
    """exp(entropy of the normalised singular values) of the centred embedding: 1 when every cell
    lies on one line, the dimension when all directions are used equally. Label-free."""
    return federated.rank_from_scatter(*federated.site_scatter(h)[2:])


def collapsed(h, erank):
    return h.shape[1] > 2 and erank < COLLAPSE_ERANK


# ---------------------------------------------------------------------------------------------
# A script's first and last steps: data and clients; clusters and files
# ---------------------------------------------------------------------------------------------
def setup(args):
    """Check the arguments, resolve the defaults, print the config, seed everything, then load,
    preprocess and partition the data. Everything a user can get wrong fails here, before training."""
    t_start = time.time()
    cli.check_args(args)
    cli.resolve(args)
    torch.set_num_threads(1)  # one thread per op: parallelism is across clients (--threads)
    print(f"config {json.dumps(vars(args))}", flush=True)
    print(f"torch {torch.__version__}  clients trained at once {args.threads}", flush=True)
    seed_everything(args.seed)
    data = federated.load_sites(args) if args.sites else federated.load_federated(args) if args.preprocess == "federated" else load(args)[0]
    data.t_start = t_start
    cli.check_data(args, data)
    if len(data.X) < args.clients:
        raise D.DataError(f"{len(data.X)} cells for {args.clients} clients; use fewer --clients")
    cli.default_types_per_client(args, data.y)
    if args.preprocess == "pooled" and not args.sites:
        data.parts = D.partition(data.y, args.clients, args.partition, args.types_per_client,
                                 args.dirichlet_alpha, args.seed, args.shuffle_classes, n_cells=len(data.X))
    for k, idx in enumerate(data.parts):
        types = "" if data.y is None else f"  types {sorted(set(data.y[idx].tolist()))}"
        print(f"client {k}: {len(idx)} cells{types}", flush=True)
    unused = len(data.X) - len(np.unique(np.concatenate(data.parts)))
    if unused and args.evaluate != "pooled":  # federated metrics cluster only the sites' cells
        cli.check(len(data.X) - unused > data.n_clusters, f"{len(data.X) - unused} cells are on clients for "
                  f"{data.n_clusters} clusters: federated evaluation clusters only them; use fewer --n-clusters")
    if unused:
        print(f"{unused} cells belong to no client (not trained on; still evaluated)", flush=True)
    return data


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
    print(f"data {path} ({used}): {len(X)} cells x {X.shape[1]} genes, "
          f"{'no labels' if y is None else f'{len(np.unique(y))} types'}", flush=True)
    barcodes = found.get("barcodes")
    return D.Data(X, y, [], k, cells, names, None if barcodes is None else np.asarray(barcodes)[cells], genes), counts


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finish(args, data, model=None, log=None, h=None):
    """Cluster the final global encoder's embedding (or a given one, h) and save the run."""
    evaluate = getattr(args, "evaluate", "pooled")
    sites = lambda: [data.X[idx] for idx in data.parts]  # --bn-stats recompute from the sites' cells only
    if h is None:
        h = embed(args, model, data.X, sites() if evaluate == "federated" else None)
    try:
        if evaluate == "federated":
            metrics, pred = federated.federated_metrics(h, data, args.seed)
        else:
            metrics, pred = cluster_metrics(h, data.y, data.n_clusters, args.seed)
        if evaluate == "both":
            h_fed = h if model is None else embed(args, model, data.X, sites())
            metrics |= {f"fed_{k}": v for k, v in federated.federated_metrics(h_fed, data, args.seed)[0].items()}
        if getattr(args, "bn_stats", "running") == "recompute" and model is not None and evaluate != "federated":
            # the same encoder with FedAvg's running statistics, as bn_running_* columns: the tuning
            # grid compares both BatchNorm choices without training twice
            plain = copy.copy(args)
            plain.bn_stats = "running"
            m, _ = cluster_metrics(embed(plain, model, data.X), data.y, data.n_clusters, args.seed)
            metrics |= {f"bn_running_{k}": m[k] for k in ("ari", "nmi", "sil") if k in m}
    except Diverged:  # NaN weights after the last step: the row says so
        runs.save_run(args, data, log, "diverged")
        raise
    if collapsed(h, metrics["erank"]):
        print(f"warning: the embedding has collapsed (effective rank {metrics['erank']:.2f} < "
              f"{COLLAPSE_ERANK}): its clusters mean little; try another --lr or method", flush=True)
    print("final  " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())
          + f"  time {time.time() - data.t_start:.1f}s", flush=True)
    return runs.save_run(args, data, log, "ok", metrics, h, pred)
