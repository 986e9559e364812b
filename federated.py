"""Keeping every step at the sites: each federated step as SITE functions (they see one site's
cells) and SERVER functions (they see only what the sites send: counts, per-gene sums and moments,
per-feature sums, per-cluster sums and contingency tables; never a row per cell). The in-process
scripts and the Flower app (flower/) call the same functions. Used by --preprocess federated,
--sites, --bn-stats recompute and --evaluate federated; the default run needs none of it.

    preprocess_federated      per-gene totals, median library size by bisection, HVG moments, scaling
    load_federated, load_sites   split the raw counts first (or read one file per site), then preprocess
    recompute_bn              BatchNorm statistics from the sites' per-feature sums
    federated_kmeans          KMeans from per-cluster sums; ARI / NMI from summed contingency tables
    federated_metrics         --evaluate federated: every metric from per-site aggregates
"""
import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn

import cli
import data as D


# ---------------------------------------------------------------------------------------------
# Federated preprocessing: the same steps as data.preprocess from per-site statistics
# ---------------------------------------------------------------------------------------------

def site_moments(X):
    """SITE: per-gene (n, mean, M2 = sum of squared deviations) of its cells, two-pass; a sparse
    matrix stays sparse (its zeros add (0 - mean)^2 each)."""
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


def federated_kth(count_at_most, k, hi):
    """SERVER: the k-th smallest (1-based) of the sites' integer values in [0, hi], by bisection:
    each query asks every site only how many of its values are <= t."""
    lo = 0
    while lo < hi:
        t = (lo + hi) // 2
        if sum(f(t) for f in count_at_most) >= k:
            hi = t
        else:
            lo = t + 1
    return lo


def preprocess_federated(sites, n_genes):
    """preprocess() over several sites without pooling their cells. sites: raw counts (cells x the
    same genes) per site. Returns (float32 matrix per site, kept cell indices per site, kept
    genes); equal to preprocess() of the stacked sites up to float rounding."""
    sites = [sp.csr_matrix(X, dtype=np.float64, copy=True) for X in sites]
    for X in sites:
        np.ceil(X.data, out=X.data)
    # genes: SITES send per-gene totals, the SERVER keeps the non-empty genes
    genes = np.flatnonzero(sum(np.asarray(X.sum(0)).ravel() for X in sites) >= 1)
    sites = [X[:, genes] for X in sites]
    # cells: each SITE drops its empty cells; library sizes stay on the sites
    cells = [np.flatnonzero(np.asarray(X.sum(1)).ravel() >= 1) for X in sites]
    sites = [X[c] for X, c in zip(sites, cells)]
    lib = [np.asarray(X.sum(1)).ravel() for X in sites]
    n = sum(len(l) for l in lib)
    if n < 2 or len(genes) < 2:
        raise D.DataError(f"after removing empty cells/genes only {n} cells x {len(genes)} genes are left")
    # median library size: the SERVER bisects on "how many of your cells have a total <= t"
    count_at_most = [lambda t, l=l: int((l <= t).sum()) for l in lib]
    hi = int(sum(l.sum() for l in lib))  # an aggregate bound: the sum of all counts
    median = federated_kth(count_at_most, (n + 1) // 2, hi)
    if n % 2 == 0:
        median = (median + federated_kth(count_at_most, n // 2 + 1, hi)) / 2
    for X, l in zip(sites, lib):  # each SITE scales its cells to the median
        X.data *= np.repeat(median / l, np.diff(X.indptr))
    # HVGs: SITES send per-gene moments of the normalised values, the SERVER picks the genes
    n_all, mean, m2 = merge_moments([site_moments(X) for X in sites])
    keep = D.hvg_from_moments(mean, m2 / (n_all - 1), n_genes)
    logs = [np.log1p(X[:, np.flatnonzero(keep)].toarray()) for X in sites]
    # scaling: SITES send moments of the log values, the SERVER returns each gene's mean and std
    _, mean, m2 = merge_moments([site_moments(L) for L in logs])
    std = np.sqrt(m2 / (n_all - 1))
    std[std == 0] = 1
    return [((L - mean) / std).astype(np.float32) for L in logs], cells, genes[keep]


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


# ---------------------------------------------------------------------------------------------
# Federated evaluation: SITE functions see one site's embedding; the SERVER gets per-cluster sums,
# counts, inertias and contingency tables, never one row per cell
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
    """Effective rank from the scatter matrix: its eigenvalues are the squared singular values."""
    s = np.sqrt(np.clip(np.linalg.eigvalsh(scatter), 0, None))
    if s.sum() <= 0 or not np.isfinite(s).all():
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


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


def federated_metrics(h, data, seed):
    """--evaluate federated: each client embeds its own cells (the rows data.parts[k] of h) and
    only per-cluster sums, counts, inertias and contingency tables reach the server. Cells held by
    no client are not evaluated (pred = -1)."""
    if not np.isfinite(h).all():
        raise cli.Diverged("the embedding holds NaN or inf values; try a smaller --lr")
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
