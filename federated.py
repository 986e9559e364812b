"""Keeping every step at the sites: each federated step as a SERVER function and the SITE functions
that answer it. The server only ever talks to the sites through one interface,

    sites.ask(action, **payload) -> one reply per site, in site order

where payload and replies are plain dicts of numpy arrays and numbers. A site answers with
site_step(state, action, payload), which calls site_<action>(state, **payload) on its own state (a
dict: its cells, and what it keeps between questions). What crosses is counts, per-gene sums and
moments, per-feature sums, per-cluster sums and contingency tables; never an array with a row per
cell. In process, LocalSites loops over the sites' states; the Flower app (flower/) sends the same
questions as messages and each SuperNode calls site_step. Used by --preprocess federated, --sites,
--bn-stats recompute and --evaluate federated; the default run needs none of it.

    SERVER function     in process               what the sites send
    server_preprocess   preprocess_federated     per-gene totals, counts of cells below a library size
                                                 (the median by bisection), per-gene moments
    server_bn           recompute_bn             per-feature sums of each BatchNorm layer's input
    server_metrics      federated_metrics        scatter matrices, local centroids, per-cluster sums
                                                 (federated_kmeans, federated_lloyd), contingency tables
    load_federated, load_sites: split the raw counts first (or read one file per site), then preprocess
"""
import re

import numpy as np
import scipy.sparse as sp
import torch

import cli
import data as D
import formats


class LocalSites:
    """The sites interface in process: ask() runs the SITE function on every site's state in turn."""

    def __init__(self, states):
        self.states = states

    def ask(self, action, **payload):
        return [site_step(state, action, payload) for state in self.states]


SITE_STEPS = ("totals", "library", "count", "hvg_moments", "log_moments", "scale", "bn_moments",
              "embedding_moments", "local_kmeans", "lloyd", "clusters")


def site_step(state, action, payload):
    """SITE: its reply to the server's question `action` (the function site_<action>), from its own state."""
    if action not in SITE_STEPS:
        raise ValueError(f"no site step '{action}'; the steps are {', '.join(SITE_STEPS)}")
    return globals()[f"site_{action}"](state, **payload)


# ---------------------------------------------------------------------------------------------
# Federated preprocessing: the same steps as data.preprocess from per-site statistics
# ---------------------------------------------------------------------------------------------

def site_moments(X):
    """SITE: per-gene (n, mean, M2 = sum of squared deviations) of its cells (sparse stays sparse)."""
    n = X.shape[0]
    if not sp.issparse(X):
        mean = X.mean(0)
        return n, mean, ((X - mean) ** 2).sum(0)
    X = sp.csc_matrix(X)
    mean = np.asarray(X.sum(0)).ravel() / n
    nnz = np.diff(X.indptr)
    col = np.repeat(np.arange(X.shape[1]), nnz)
    m2 = np.bincount(col, (X.data - mean[col]) ** 2, minlength=X.shape[1]) + (n - nnz) * mean ** 2
    return n, mean, m2


def merge_moments(parts):
    """SERVER: Chan et al.'s pairwise merge of per-site (n, mean, M2) into the pooled ones."""
    n, mean, m2 = parts[0]
    for nb, mb, m2b in parts[1:]:
        delta, total = mb - mean, n + nb
        mean, m2, n = mean + delta * nb / total, m2 + m2b + delta ** 2 * n * nb / total, total
    return n, mean, m2


def site_totals(state):
    """SITE -> SERVER: per-gene totals of its raw counts (rounded up, as data.preprocess does)."""
    X = state["counts"] = sp.csr_matrix(state["counts"], dtype=np.float64, copy=True)
    np.ceil(X.data, out=X.data)
    return {"totals": np.asarray(X.sum(0)).ravel()}


def site_library(state, genes):
    """SITE -> SERVER: its number of non-empty cells over the server's genes and their summed counts."""
    X = state.pop("counts")[:, genes]
    state["genes"], state["cells"] = genes, np.flatnonzero(np.asarray(X.sum(1)).ravel() >= 1)
    state["X"] = X[state["cells"]]
    state["lib"] = np.asarray(state["X"].sum(1)).ravel()  # the library sizes stay on the site
    return {"n": len(state["lib"]), "total": state["lib"].sum()}


def site_count(state, thresholds):
    """SITE -> SERVER: for each threshold t, how many of its cells have a library size <= t."""
    return {"counts": np.searchsorted(np.sort(state["lib"]), thresholds, side="right")}


def federated_kth(sites, k, hi, at_most=None, depth=12):
    """SERVER: the k-th smallest (1-based) library size (integers in [0, hi]) by bisection over site counts."""
    lo, at_most = 0, {} if at_most is None else at_most  # threshold -> how many cells of all sites are <= it
    while lo < hi:
        t = (lo + hi) // 2
        if t not in at_most:  # one question: the thresholds of the next `depth` levels of the bisection
            asked, level = [], [(lo, hi)]
            for _ in range(depth):
                level = [(a, b) for a, b in level if a < b]
                asked += [(a + b) // 2 for a, b in level]
                level = [half for a, b in level for half in ((a, (a + b) // 2), ((a + b) // 2 + 1, b))]
            at_most.update(zip(asked, sum(r["counts"] for r in sites.ask("count", thresholds=np.array(asked)))))
        if at_most[t] >= k:
            hi = t
        else:
            lo = t + 1
    return lo


def site_hvg_moments(state, median):
    """SITE -> SERVER: per-gene (n, mean, M2) of its cells scaled to the server's median library size."""
    X = state["X"]
    X.data *= np.repeat(median / state.pop("lib"), np.diff(X.indptr))
    return dict(zip(("n", "mean", "m2"), site_moments(X)))


def site_log_moments(state, hvg):
    """SITE -> SERVER: per-gene (n, mean, M2) of the log values of the server's highly variable genes."""
    state["genes"], state["X"] = state["genes"][hvg], state["X"][:, np.flatnonzero(hvg)]
    return dict(zip(("n", "mean", "m2"), site_moments(np.log1p(state["X"].toarray()))))


def site_scale(state, mean, std):
    """SITE: z-scores its cells with the server's per-gene mean and std and keeps them as state['x']."""
    state["x"] = ((np.log1p(state.pop("X").toarray()) - mean) / std).astype(np.float32)
    return {}


def server_preprocess(sites, n_genes):
    """SERVER: data.preprocess from the sites' gene totals, counts and moments; returns kept genes, cells per site."""
    genes = np.flatnonzero(sum(r["totals"] for r in sites.ask("totals")) >= 1)  # the non-empty genes
    library = sites.ask("library", genes=genes)
    n = sum(r["n"] for r in library)
    if n < 2 or len(genes) < 2:
        raise D.DataError(f"after removing empty cells/genes only {n} cells x {len(genes)} genes are left")
    hi = int(sum(r["total"] for r in library))  # an aggregate bound: the sum of all counts
    at_most = {}  # the counts asked for so far: the second bisection of an even n follows the first
    median = federated_kth(sites, (n + 1) // 2, hi, at_most)
    if n % 2 == 0:
        median = (median + federated_kth(sites, n // 2 + 1, hi, at_most)) / 2
    n_all, mean, m2 = merge_moments([(r["n"], r["mean"], r["m2"]) for r in sites.ask("hvg_moments", median=median)])
    keep = D.hvg_from_moments(mean, m2 / (n_all - 1), n_genes)
    _, mean, m2 = merge_moments([(r["n"], r["mean"], r["m2"]) for r in sites.ask("log_moments", hvg=keep)])
    std = np.sqrt(m2 / (n_all - 1))
    std[std == 0] = 1
    sites.ask("scale", mean=mean, std=std)
    return genes[keep], [r["n"] for r in library]


def preprocess_federated(sites, n_genes):
    """preprocess() over several sites without pooling their cells. sites: raw counts (cells x the
    same genes) per site. Returns (float32 matrix per site, kept cell indices per site, kept
    genes); equal to preprocess() of the stacked sites up to float rounding."""
    states = [{"counts": X} for X in sites]
    genes, _ = server_preprocess(LocalSites(states), n_genes)
    return [s["x"] for s in states], [s["cells"] for s in states], genes


def load_federated(args):
    """Split the raw counts over the clients first, then preprocess them from per-site statistics
    (data.preprocess_federated); Data.X holds the sites' cells one site after another."""
    path = D.resolve_data(args.data)
    found = {}
    counts, y, names, used = D.read_counts(path, args.label_key or None, args.labels or None,
                                           args.transpose, args.layer or None, found)
    if y is None and args.n_clusters < 1:
        raise D.DataError(f"'{path}' has no cell-type labels: pass --n-clusters to choose k")
    cli.default_types_per_client(args, y)
    parts = D.partition(y, args.clients, args.partition, args.types_per_client, args.dirichlet_alpha,
                        args.seed, args.shuffle_classes, n_cells=counts.shape[0])
    counts = sp.csr_matrix(counts)
    sites, kept, genes = preprocess_federated([counts[p] for p in parts], args.n_genes)
    cells = np.concatenate([p[k] for p, k in zip(parts, kept)])
    sizes = np.cumsum([0] + [len(k) for k in kept])
    for k, n in enumerate(np.diff(sizes)):
        if n < 2:
            raise D.DataError(f"client {k} holds {n} non-empty cell(s); every client needs at least 2")
    y = None if y is None else y[cells]
    barcodes = found.get("barcodes")
    data = D.Data(np.concatenate(sites), y, [np.arange(a, b) for a, b in zip(sizes[:-1], sizes[1:])],
                args.n_clusters or len(np.unique(y)), cells, names,
                None if barcodes is None else np.asarray(barcodes)[cells], genes)
    print(f"data {path} ({used}), preprocessed per site: {len(cells)} cells on the clients x "
          f"{len(genes)} genes", flush=True)
    return data


def check_shared_genes(shared, per_site, least=0.1):
    """SERVER: the sites must share at least `least` of the genes of the site with the fewest: fewer
    shared names mean another naming at some site (symbols and Ensembl ids, versions), not biology."""
    if shared < max(1, least * min(per_site)):
        raise D.DataError(f"the sites share {shared} gene name(s) of {min(per_site)} at the site with the fewest "
                          f"(genes per site: {per_site}); check that they use the same gene naming")


def check_site_labels(names):
    """SERVER: the sites' label names (one list per site) must be one vocabulary, or one type counts as
    two: no site with numbers (codes) beside a site with names, no name spelled two ways (case, spaces,
    '_', '-' or '.')."""
    number = lambda x: re.fullmatch(r"[+-]?\d+(\.\d*)?", str(x).strip()) is not None
    coded = [bool(len(n)) and all(number(x) for x in n) for n in names]
    if any(coded) and not all(coded):
        k, j = coded.index(True), coded.index(False)
        raise D.DataError(f"site {k}'s labels are numbers ({', '.join(map(str, names[k][:3]))}) and site {j}'s are "
                          f"names ({', '.join(map(str, names[j][:3]))}): give every site the same labels (names, or codes "
                          f"with one meaning)")
    two = formats.one_spelling(names)
    if two and len(names) > 1:
        raise D.DataError(f"the sites spell one label {' and '.join(repr(x) for x in two)}: as two names they would "
                          f"be two cell types; use one spelling at every site")


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
        found = {k: np.asarray(v).astype(str) for k, v in found.items()}  # gene 7 and gene '7' are one name
        barcodes, genes = found.get("barcodes"), found.get("genes")
        if barcodes is not None and len(set(barcodes)) < len(barcodes):
            raise D.DataError(f"site {k} ('{path}') has duplicate cell barcodes")
        if len(args.sites) > 1 and len(set(genes)) < len(genes):  # genes are matched by name
            dup = next(g for g, n in zip(*np.unique(genes, return_counts=True)) if n > 1)
            raise D.DataError(f"site {k} ('{path}') names {len(genes) - len(set(genes))} genes twice (e.g. '{dup}'), so "
                              f"they cannot be matched by name across sites; make its gene names unique")
        reads.append((counts, None if y is None else names[y], found.get("genes"), barcodes, used))
    genes = reads[0][2] if reads[0][2] is not None else None
    if genes is not None:
        for _, _, g, _, _ in reads[1:]:
            genes = genes[np.isin(genes, g)]  # the first site's order
        check_shared_genes(len(genes), [len(g) for _, _, g, _, _ in reads])
        dropped = [int((~np.isin(g, genes)).sum()) for _, _, g, _, _ in reads]
        print(f"genes: {len(genes)} shared by all sites; dropped per site: {dropped}", flush=True)
        def columns(g):  # the shared genes' columns in one site's file
            where = dict(zip(g, range(len(g))))
            return [where[n] for n in genes]
        reads = [(X[:, columns(g)] if list(g) != list(genes) else X, y, g, b, u) for X, y, g, b, u in reads]
    labelled = [y is not None for _, y, _, _, _ in reads]
    if any(labelled) and not all(labelled):
        raise D.DataError(f"sites {[k for k, l in enumerate(labelled) if not l]} have no labels, others do")
    if all(labelled):
        check_site_labels([np.unique(y.astype(str)) for _, y, _, _, _ in reads])
    label_names = np.unique(np.concatenate([y for _, y, _, _, _ in reads])) if all(labelled) else None
    if label_names is None and args.n_clusters < 1:
        raise D.DataError("the sites have no cell-type labels: pass --n-clusters to choose k")
    sites, kept, used_genes = preprocess_federated([X for X, _, _, _, _ in reads], args.n_genes)
    for k, c in enumerate(kept):
        if len(c) < 2:
            raise D.DataError(f"site {k} ('{args.sites[k]}') has {len(c)} non-empty cell(s); every site needs at least 2")
    sizes = np.cumsum([0] + [len(c) for c in kept])
    y = None if label_names is None else np.concatenate(
        [np.searchsorted(label_names, r[1][c]) for r, c in zip(reads, kept)])
    barcodes = None if any(r[3] is None for r in reads) else np.concatenate([r[3][c] for r, c in zip(reads, kept)])
    for k, (path, c, r) in enumerate(zip(args.sites, kept, reads)):
        print(f"site {k} ({path}, {r[4]}): {len(c)} cells", flush=True)
    data = D.Data(np.concatenate(sites), y, [np.arange(a, b) for a, b in zip(sizes[:-1], sizes[1:])],
                args.n_clusters or len(label_names), np.concatenate(kept), label_names, barcodes, used_genes)
    data.genes = used_genes if genes is None else genes[used_genes]
    return data


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics from the sites (--bn-stats recompute)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def site_bn_moments(state, layer, **weights):
    """SITE -> SERVER: per-feature (n, sum, sum of squares) of BatchNorm `layer`'s input on its cells."""
    net = state["net"]  # the encoder, with the server's weights (eval mode)
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
    seen = []
    handle = net.get_submodule(layer).register_forward_pre_hook(lambda m, inp: seen.append(inp[0].double()))
    try:
        net.eval()(torch.as_tensor(state["x"]))
    finally:
        handle.remove()
    a = seen[0]
    return {"n": len(a), "sum": a.sum(0).numpy(), "sumsq": (a * a).sum(0).numpy()}


def merge_bn_moments(parts):
    """SERVER: the pooled mean and (biased, as BatchNorm's training mode uses) variance per feature."""
    n = sum(p[0] for p in parts)
    mean = sum(p[1] for p in parts) / n
    return mean, np.maximum(sum(p[2] for p in parts) / n - mean * mean, 0)


def server_bn(sites, weights):
    """SERVER: the encoder's weights ({name: array}) with each BatchNorm layer's statistics merged from the sites."""
    weights = dict(weights)
    for layer in [k[: -len(".running_mean")] for k in weights if k.endswith(".running_mean")]:  # in forward order
        replies = sites.ask("bn_moments", layer=layer, **weights)
        mean, var = merge_bn_moments([(r["n"], r["sum"], r["sumsq"]) for r in replies])
        weights[f"{layer}.running_mean"] = mean.astype(weights[f"{layer}.running_mean"].dtype)
        weights[f"{layer}.running_var"] = var.astype(weights[f"{layer}.running_var"].dtype)
    return weights


def recompute_bn(net, sites):
    """--bn-stats recompute: FedAvg averages the clients' BatchNorm running statistics, and with
    non-IID clients the average of per-client variances misses the variance between clients. Each
    BatchNorm layer of net, in order, gets the mean and variance of its input over the cells of all
    sites (tensors, one per site), so that in eval mode the encoder normalises as it would in
    training mode on one batch of every cell."""
    weights = server_bn(LocalSites([{"net": net, "x": x} for x in sites]),
                        {k: v.numpy() for k, v in net.state_dict().items()})
    net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})


# ---------------------------------------------------------------------------------------------
# Federated evaluation: SITE functions see one site's embedding state['h']; the SERVER gets
# per-cluster sums, counts, inertias and contingency tables, never one row per cell
# ---------------------------------------------------------------------------------------------
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
    """SERVER: the effective rank from the merged scatter matrix (eigenvalues: squared singular values)."""
    s = np.sqrt(np.clip(np.linalg.eigvalsh(scatter), 0, None))
    if s.sum() <= 0 or not np.isfinite(s).all():
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def site_embedding_moments(state):
    """SITE -> SERVER: (n, mean, scatter matrix d x d) and the sum of its embeddings."""
    n, mean, scatter = site_scatter(state["h"])
    return {"n": n, "mean": mean, "scatter": scatter, "sum": state["h"].sum(0)}


def site_assign(h, centroids, previous=None):
    """SITE: its cells' nearest centroids (kept) and what it sends: per-cluster sums, counts, inertia, changed."""
    d = (h ** 2).sum(1)[:, None] - 2 * h @ centroids.T + (centroids ** 2).sum(1)[None]
    labels = d.argmin(1)
    k = len(centroids)
    sums = np.zeros_like(centroids)
    np.add.at(sums, labels, h)
    changed = len(h) if previous is None else int((labels != previous).sum())
    sent = (sums, np.bincount(labels, minlength=k), np.maximum(d[np.arange(len(h)), labels], 0).sum(), changed)
    return labels, sent


def site_local_kmeans(state, k, seed):
    """SITE -> SERVER: the centroids of a KMeans of its own cells (k, fewer if it has fewer cells), their sizes."""
    from sklearn.cluster import KMeans
    km = KMeans(min(k, len(state["h"])), n_init=1, random_state=seed).fit(state["h"])
    return {"centroids": km.cluster_centers_, "sizes": np.bincount(km.labels_, minlength=len(km.cluster_centers_))}


def site_lloyd(state, centroids, restarts, first):
    """SITE -> SERVER: site_assign's sums, counts, inertia, changed per restart (keys end in r); labels stay here."""
    if first:
        state["assigned"] = np.zeros((len(restarts), len(state["h"])), np.int64)  # restart x cell
    out = {}
    for c, r in zip(centroids, restarts):
        state["assigned"][r], sent = site_assign(state["h"], c, None if first else state["assigned"][r])
        out.update({f"{key}{r}": v for key, v in zip(("sums", "counts", "inertia", "changed"), sent)})
    return out


def federated_lloyd(sites, inits, max_iter=300):
    """SERVER: Lloyd's KMeans from each init in lockstep, from per-cluster sums; returns [(centroids, inertia)]."""
    cent, inertia = list(inits), {}  # an empty cluster keeps its centroid; a restart stops when no cell moved
    for it in range(max_iter):
        running = [r for r in range(len(cent)) if r not in inertia]
        if not running:
            break
        sent = sites.ask("lloyd", centroids=np.stack([cent[r] for r in running]), restarts=np.array(running), first=it == 0)
        for r in running:
            sums, counts = sum(s[f"sums{r}"] for s in sent), sum(s[f"counts{r}"] for s in sent)
            changed = sum(s[f"changed{r}"] for s in sent)
            if changed:
                cent[r] = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], cent[r])
            if not changed or it == max_iter - 1:
                inertia[r] = sum(s[f"inertia{r}"] for s in sent)
    return [(cent[r], inertia[r]) for r in range(len(cent))]


def federated_kmeans(sites, k, seed, n_init=10):
    """SERVER: KMeans++ restarts seeded from the sites' local centroids, federated Lloyd; (centroids, restart, inertia)."""
    from sklearn.cluster import kmeans_plusplus
    local = sites.ask("local_kmeans", k=k, seed=seed)
    centroids, sizes = np.concatenate([r["centroids"] for r in local]), np.concatenate([r["sizes"] for r in local])
    rng = np.random.RandomState(seed)
    inits = [kmeans_plusplus(centroids, k, sample_weight=sizes.astype(float), random_state=rng)[0] for _ in range(n_init)]
    fits = federated_lloyd(sites, inits)
    best = min(range(n_init), key=lambda r: fits[r][1])  # the smallest summed inertia, the first on ties
    return fits[best][0], best, fits[best][1]


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


def site_clusters(state, centroids, restart, n_classes=None):
    """SITE -> SERVER: cluster sizes, summed simplified silhouette, contingency table; keeps state['clusters']."""
    h, labels = state["h"], state["assigned"][restart]
    state["clusters"], rows = labels, np.arange(len(h))
    d = np.sqrt(np.maximum((h ** 2).sum(1)[:, None] - 2 * h @ centroids.T + (centroids ** 2).sum(1)[None], 0))
    a = d[rows, labels]
    d[rows, labels] = np.inf
    b = d.min(1)
    out = {"counts": np.bincount(labels, minlength=len(centroids)),
           "sil": np.where(np.maximum(a, b) > 0, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0).sum()}
    if n_classes is not None:  # the site knows its cells' types
        out["table"] = site_contingency(state["y"], labels, n_classes, len(centroids))
    return out


def server_metrics(sites, k, seed, n_classes=None):
    """SERVER: erank, KMeans, ARI/NMI, Calinski-Harabasz and simplified silhouette from the sites' aggregates."""
    spread = sites.ask("embedding_moments")
    out = {"erank": rank_from_scatter(merge_scatter([(r["n"], r["mean"], r["scatter"]) for r in spread])[2])}
    cent, best, inertia = federated_kmeans(sites, k, seed)
    fin = sites.ask("clusters", centroids=cent, restart=best, n_classes=n_classes)
    if n_classes is not None:
        out["ari"], out["nmi"] = scores_from_contingency(sum(r["table"] for r in fin))
    k, n, counts = len(cent), sum(r["n"] for r in spread), sum(r["counts"] for r in fin)
    mean = sum(r["sum"] for r in spread) / n
    between = (counts * ((cent - mean) ** 2).sum(1)).sum()
    out["ch"] = between / (k - 1) / (inertia / (n - k)) if inertia > 0 and (counts > 0).sum() > 1 else float("nan")
    out["sil_simplified"] = 100 * sum(r["sil"] for r in fin) / n
    return out


def federated_metrics(h, data, seed):
    """--evaluate federated: each client's cells are the rows data.parts[k] of h, and only per-cluster
    sums, counts, inertias and contingency tables reach the server (server_metrics). Returns the
    metrics and each cell's cluster; cells held by no client are not evaluated (pred = -1)."""
    if not np.isfinite(h).all():
        raise cli.Diverged("the embedding holds NaN or inf values; try a smaller --lr")
    states = [{"h": h[idx], "y": None if data.y is None else data.y[idx]} for idx in data.parts]
    out = server_metrics(LocalSites(states), data.n_clusters, seed, None if data.y is None else int(data.y.max()) + 1)
    pred = np.full(len(h), -1)
    for idx, s in zip(data.parts, states):
        pred[idx] = s["clusters"]
    return out, pred
