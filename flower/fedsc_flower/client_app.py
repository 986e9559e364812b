"""ClientApp: one SuperNode = one site. It reads only its own cells (node config data-path="...",
or in simulation its partition-id's part of the run's benchmark file), answers the server's
preprocessing and evaluation questions with per-gene and per-cluster statistics, and trains with
the method file's own download -> local_update -> upload.

A ClientApp object is made anew for every message: everything a site keeps between messages
(its preprocessed cells, library sizes, its model incl. the target / key encoder, the method's
client.state such as FedSC's lambda or MoCo's queue, its torch.Generator, its embedding and
KMeans labels) lives in context.state, which never leaves the SuperNode."""
import copy
import os

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsc_flower.records import SiteError, args_from_text, config, method_module, pack, pack_state, repo, unpack, unpack_state

app = ClientApp()


class Site:
    """One message's view of the site: the repository's modules, the run's args, the site's id."""

    def __init__(self, msg, context):
        import torch
        repo(context.node_config, context.run_config)
        import common
        import data as D
        import cli, federated, formats
        torch.set_num_threads(1)  # as common.setup: one thread per op
        self.common, self.D, self.context, self.state = common, D, context, context.state
        self.cli, self.federated, self.formats = cli, federated, formats
        self.cfg = msg.content["config"]
        self.arrays = unpack(msg.content["arrays"]) if "arrays" in msg.content else {}
        self.mod = method_module(self.cfg["method"])
        self.args = args_from_text(self.mod, self.cfg["args"])
        self.cid = int(self.cfg.get("cid", -1))
        path = context.node_config.get("data-path", "")
        self.path = str(path) if path else ""
        self.where = self.path or f"partition {context.node_config.get('partition-id', '?')}"

    # -- reading and preprocessing (federated.preprocess_federated, one step per message) -------------
    def read(self):
        """SITE: its raw counts (cells x genes, the server's shared genes when it named them), label
        names per cell or None, gene names or None, cell names, and the cells' row numbers in its file."""
        D, args, node = self.D, self.args, self.context.node_config
        found = {}
        if self.path:
            counts, y, names, used = D.read_counts(self.path, args.label_key or None, None, args.transpose,
                                                   args.layer or None, found)
            rows = np.arange(counts.shape[0])
        else:  # simulation: this node's part of the run's file, the in-process loop's partition
            if "partition-id" not in node:
                raise SiteError("the SuperNode has neither node config data-path nor partition-id")
            pid, path = int(node["partition-id"]), D.resolve_data(args.data)
            counts, y, names, used = D.read_counts(path, args.label_key or None, args.labels or None, args.transpose,
                                                   args.layer or None, found)
            self.cli.default_types_per_client(args, y)
            parts = D.partition(y, args.clients, args.partition, args.types_per_client, args.dirichlet_alpha,
                                args.seed, args.shuffle_classes, n_cells=counts.shape[0])
            if pid >= len(parts):
                raise SiteError(f"partition-id {pid} but the run has {len(parts)} sites")
            import scipy.sparse as sp
            rows = parts[pid]
            counts, y = sp.csr_matrix(counts)[rows], None if y is None else y[rows]
        labels = None if y is None else names[y]
        genes, barcodes = found.get("genes"), found.get("barcodes")
        if "genes" in self.cfg:  # the server's shared genes, by name, in its order
            if genes is None:
                raise SiteError("the file has no gene names, so its genes cannot be matched with the other sites'")
            where = dict(zip(np.asarray(genes).astype(str), range(len(genes))))
            shared = list(self.cfg["genes"])
            cols = [where[g] for g in shared]
            if cols != list(range(len(genes))):
                counts = counts[:, cols]
            genes = np.array(shared)
        cells = barcodes[rows] if barcodes is not None and not self.path else barcodes
        cells = rows.astype(str) if cells is None else np.asarray(cells).astype(str)
        return counts, labels, None if genes is None else np.asarray(genes).astype(str), cells, rows

    def counts(self):
        """The raw counts as preprocess_federated starts: float64 CSR, ceiled."""
        import scipy.sparse as sp
        X, labels, genes, cells, rows = self.read()
        X = sp.csr_matrix(X, dtype=np.float64, copy=True)
        np.ceil(X.data, out=X.data)
        return X, labels, genes, cells

    def normalised(self):
        """Non-empty genes (the server's), non-empty cells, each scaled to the median library size."""
        X, labels, genes, cells = self.counts()
        X = X[:, self.arrays["genes"]]
        c = np.flatnonzero(np.asarray(X.sum(1)).ravel() >= 1)
        X = X[c]
        lib = np.asarray(X.sum(1)).ravel()
        if "median" in self.cfg:
            X.data *= np.repeat(self.cfg["median"] / lib, np.diff(X.indptr))
        return X, lib, c, labels, genes, cells


def _reply(msg, **records):
    return Message(RecordDict(records), reply_to=msg)


def _step(action):
    """A query handler: the site's answer, or its error as one line that names the site."""
    def wrap(fn):
        def handle(msg: Message, context: Context) -> Message:
            try:
                site = Site(msg, context)
            except SiteError as e:
                return _reply(msg, error=ConfigRecord({"error": str(e)}))
            try:
                return fn(site, msg)
            except (SiteError, site.D.DataError) as e:
                return _reply(msg, error=ConfigRecord({"error": f"site {site.cid} ({site.where}): {e}"}))
            except site.common.Diverged as e:
                return _reply(msg, error=ConfigRecord({"diverged": f"site {site.cid} ({site.where}): {e}"}))
        handle.__name__ = action
        return app.query(action)(handle) if action != "train" else app.train()(handle)
    return wrap


@_step("hello")
def hello(site, msg):
    """SITE -> SERVER: what the server needs to match the sites: gene names, the file's sha256."""
    node = site.context.node_config
    if site.path:
        if not os.path.exists(site.path):
            raise SiteError("the file does not exist")
        found = {}
        X, y, names, used = site.D.read_counts(site.path, site.args.label_key or None, None, site.args.transpose,
                                               site.args.layer or None, found)
        barcodes = found.get("barcodes")
        if barcodes is not None and len(set(barcodes)) < len(barcodes):
            raise SiteError("duplicate cell barcodes")
        genes, sha = found.get("genes"), site.D.sha256sum(site.path)
        name = os.path.basename(site.path)
    else:
        genes, sha, name = None, site.D.sha256sum(site.D.resolve_data(site.args.data)), ""
    return _reply(msg, reply=config(
        name=name, sha256=sha, order=int(node.get("partition-id", -1)),
        genes=None if genes is None else [str(g) for g in genes],
        parts=int(node.get("num-partitions", -1))))


@_step("totals")
def totals(site, msg):
    """SITE -> SERVER: per-gene totals of its counts, its number of non-empty cells and its label
    names. It keeps its cells' library sizes for the median's questions (the genes the server will
    drop are empty everywhere, so they add nothing to a library size)."""
    X, labels, genes, cells = site.counts()
    lib = np.asarray(X.sum(1)).ravel()
    lib = lib[lib >= 1]
    site.state["fedsc.lib"] = pack({"lib": lib})
    return _reply(msg, arrays=pack({"totals": np.asarray(X.sum(0)).ravel()}),
                  reply=config(labels=None if labels is None else sorted(set(labels.tolist())), n=len(lib)))


@_step("count")
def count(site, msg):
    """SITE -> SERVER: how many of its cells have a library size <= t, for each t asked."""
    lib = unpack(site.state["fedsc.lib"])["lib"]
    return _reply(msg, reply=config(counts=[int((lib <= t).sum()) for t in site.cfg["thresholds"]]))


@_step("moments")
def moments(site, msg):
    """SITE -> SERVER: per-gene (n, mean, M2) of its normalised values (the server picks the HVGs)."""
    X, *_ = site.normalised()
    n, mean, m2 = site.federated.site_moments(X)
    return _reply(msg, reply=config(n=n), arrays=pack({"mean": mean, "m2": m2}))


def _logs(site):
    X, lib, c, labels, genes, cells = site.normalised()
    keep = site.arrays["hvg"]
    return np.log1p(X[:, np.flatnonzero(keep)].toarray()), c, labels, genes, cells, keep


@_step("log_moments")
def log_moments(site, msg):
    """SITE -> SERVER: per-gene moments of the log values of the HVGs (the server returns mean, std)."""
    L, *_ = _logs(site)
    n, mean, m2 = site.federated.site_moments(L)
    return _reply(msg, reply=config(n=n), arrays=pack({"mean": mean, "m2": m2}))


@_step("scale")
def scale(site, msg):
    """SITE: z-scores its cells with the server's mean and std and keeps them for training."""
    L, c, labels, genes, cells, keep = _logs(site)
    X = ((L - site.arrays["mean"]) / site.arrays["std"]).astype(np.float32)
    if len(X) < 2:
        raise SiteError(f"{len(X)} non-empty cell(s); every site needs at least 2")
    kept_genes = site.arrays["genes"][np.flatnonzero(keep)]
    site.state["fedsc.cells"] = pack({
        "x": X, "names": cells[c], "genes": genes[kept_genes] if genes is not None else kept_genes.astype(str),
        **({} if labels is None else {"labels": labels[c].astype(str)})})
    del site.state["fedsc.lib"]
    return _reply(msg, reply=config(n=len(X)))


# ---------------------------------------------------------------------------------------------
# Training: the method file's download -> local_update -> upload, the client kept in context.state
# ---------------------------------------------------------------------------------------------
def _load_client(site, x, global_state):
    """The client as it was after its last round; the first time, common.make_client's: the server's
    initial model (every module, as sent in round 0) and the generator seeded by the seed and its id."""
    import torch
    common, state = site.common, site.state
    with torch.random.fork_rng():  # building the networks draws numbers the weights then replace
        model = site.mod.make_model(x.shape[1], site.args)
    if "fedsc.model" not in state:
        for key, module in model.items():
            module.load_state_dict(global_state[key])
        return common.make_client(site.cid, x, model, site.args.seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in unpack(state["fedsc.model"]).items()})
    tensors = unpack(state["fedsc.client_tensors"])
    gen = torch.Generator()
    gen.set_state(torch.from_numpy(tensors.pop("__generator__")))
    values = dict(state["fedsc.client_values"]) if "fedsc.client_values" in state else {}
    return common.Client(site.cid, x, model, gen, {**values, **{k: torch.from_numpy(v) for k, v in tensors.items()}})


def _save_client(site, client):
    import torch
    tensors = {k: v for k, v in client.state.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in client.state.items() if k not in tensors}
    for k, v in values.items():
        if not isinstance(v, (bool, int, float, str)):
            raise SiteError(f"client.state['{k}'] is a {type(v).__name__}; only tensors and numbers can be kept")
    site.state["fedsc.model"] = pack(client.model.state_dict())
    site.state["fedsc.client_tensors"] = pack({"__generator__": client.gen.get_state(), **tensors})
    site.state["fedsc.client_values"] = ConfigRecord(values)


@_step("train")
def train(site, msg):
    """CLIENT: download(global) -> local_update(lr) -> upload; replies the uploaded modules' weights
    and the cell count (and the round's log entries: loss, FedSC's mu and divergence)."""
    import torch
    x = torch.from_numpy(unpack(site.state["fedsc.cells"])["x"])
    global_state = unpack_state(msg.content["arrays"])
    client = _load_client(site, x, global_state)
    entry = site.mod.download(client, global_state, site.args)
    entry.update(site.mod.local_update(client, site.cfg["lr"], site.args))
    weights, n = site.mod.upload(client)
    _save_client(site, client)
    return _reply(msg, arrays=pack_state(weights),
                  metrics=MetricRecord({"num-examples": int(n), **{k: float(v) for k, v in entry.items()}}))


# ---------------------------------------------------------------------------------------------
# Evaluation: federated.federated_metrics' SITE steps, one message each
# ---------------------------------------------------------------------------------------------
def _model(site, x, arrays):
    """The method's model with the server's weights loaded (built without touching the torch RNG)."""
    import torch
    with torch.random.fork_rng():
        model = site.mod.make_model(x.shape[1], site.args)
    for key, state in unpack_state(arrays).items():
        model[key].load_state_dict(state)
    return model


@_step("bn_moments")
def bn_moments(site, msg):
    """SITE: federated.site_bn_moments of one BatchNorm layer of the online encoder on its cells."""
    import torch
    x = unpack(site.state["fedsc.cells"])["x"]
    online = _model(site, x, msg.content["arrays"])["online"].eval()
    with torch.no_grad():
        n, s, ss = site.federated.site_bn_moments(online, torch.from_numpy(x), dict(online.named_modules())[site.cfg["layer"]])
    return _reply(msg, reply=config(n=n), arrays=pack({"sum": s.numpy(), "sumsq": ss.numpy()}))


@_step("embed")
def embed(site, msg):
    """SITE: embeds its own cells with the final global encoder (kept here); sends its local KMeans
    centroids and their sizes, its (n, mean, scatter) and the sum of its embeddings."""
    import torch
    from sklearn.cluster import KMeans
    cells = unpack(site.state["fedsc.cells"])
    model = _model(site, cells["x"], msg.content["arrays"])
    args = copy.copy(site.args)
    args.bn_stats = "running"  # with --bn-stats recompute the server has already put the sites' statistics in
    h = site.common.embed(args, model, cells["x"])
    if not np.isfinite(h).all():
        raise site.common.Diverged("the embedding holds NaN or inf values; try a smaller --lr")
    k = int(site.cfg["k"])
    km = KMeans(min(k, len(h)), n_init=1, random_state=site.args.seed).fit(h)
    n, mean, scatter = site.federated.site_scatter(h)
    site.state["fedsc.eval"] = pack({"h": h})
    return _reply(msg, reply=config(n=n), arrays=pack({
        "centroids": km.cluster_centers_, "sizes": np.bincount(km.labels_, minlength=len(km.cluster_centers_)),
        "mean": mean, "scatter": scatter, "sum": h.sum(0)}))


@_step("assign")
def assign(site, msg):
    """SITE: federated.site_assign for each KMeans restart still running; the labels stay here."""
    ev = unpack(site.state["fedsc.eval"])
    a = unpack(msg.content["arrays"])
    restarts, first = list(site.cfg["restarts"]), bool(site.cfg["first"])
    labels = ev.get("labels", np.zeros((int(site.cfg["n_init"]), len(ev["h"])), np.int64))
    out = {}
    for i, r in enumerate(restarts):
        labels[r], (sums, counts, inertia, changed) = site.federated.site_assign(
            ev["h"], a["centroids"][i], None if first else labels[r])
        out.update({f"sums{r}": sums, f"counts{r}": counts, f"inertia{r}": np.float64(inertia), f"changed{r}": np.int64(changed)})
    site.state["fedsc.eval"] = pack({"h": ev["h"], "labels": labels})
    return _reply(msg, arrays=pack(out))


@_step("finish")
def finish(site, msg):
    """SITE: with the winning restart's clusters, sends its contingency table, cluster sizes and summed
    simplified silhouette, and writes its own cells, annotated, as an .h5ad (as save_run does)."""
    federated, cfg = site.federated, site.cfg
    ev, cells = unpack(site.state["fedsc.eval"]), unpack(site.state["fedsc.cells"])
    cent = unpack(msg.content["arrays"])["centroids"]
    h, labels, k = ev["h"], ev["labels"][int(cfg["best"])], len(cent)
    out = {"counts": np.bincount(labels, minlength=k)}
    if "labels" in cells:
        names = np.asarray(cfg["label_names"])
        out["table"] = federated.site_contingency(np.searchsorted(names, cells["labels"]), labels, len(names), k)
    d = np.sqrt(np.maximum((h ** 2).sum(1)[:, None] - 2 * h @ cent.T + (cent ** 2).sum(1)[None], 0))
    a = d[np.arange(len(h)), labels]
    d[np.arange(len(h)), labels] = np.inf
    b = d.min(1)
    out["sil"] = np.float64(np.where(np.maximum(a, b) > 0, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0).sum())
    key = site.args.method.lower()
    folder = os.path.join(site.context.node_config.get("out-dir", "") or cfg["out_dir"], "runs", cfg["run"])
    os.makedirs(folder, exist_ok=True)
    stem = os.path.basename(site.path).split(".")[0] if site.path else \
        f"{os.path.basename(site.args.data).split('.')[0]}_part{site.context.node_config['partition-id']}"
    path = os.path.join(folder, f"site{site.cid}_{stem}.h5ad")
    columns = {f"{key}_cluster": labels} | ({} if "labels" not in cells else {"cell_type": cells["labels"]})
    site.formats.write_h5ad(path, cells["x"], cells["names"], cells["genes"], columns,
                      {f"X_{key}": h.astype(np.float32)}, {f"{key}_config": cfg["config"]})
    return _reply(msg, arrays=pack(out), reply=config(path=os.path.abspath(path)))
