"""ClientApp: one SuperNode = one site. It reads only its own cells (node config data-path="...",
or in simulation its partition-id's part of the run's benchmark file), answers the server's
preprocessing and evaluation questions with federated.site_step (the SITE functions the in-process
runs call), and trains with the method file's own download -> local_update -> upload.

A ClientApp object is made anew for every message: everything a site keeps between messages (its
site state: its preprocessed cells, library sizes, embedding and KMeans labels; its model incl. the
target / key encoder, the method's client.state such as FedSC's lambda or MoCo's queue, its
torch.Generator) lives in context.state, which never leaves the SuperNode. Run by the long-lived worker
(worker.py, KEPT_IN_PROCESS), the same values stay in that process's memory instead (KEPT), unpacked."""
import copy
import os

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsc_flower.records import (SiteError, args_from_text, content, method_module, pack, pack_site, plain, repo,
                                  unflat, unpack, unpack_site)

app = ClientApp()
KEPT_IN_PROCESS = False  # worker.py sets it: state kept in KEPT, not packed into context.state
KEPT = {}  # (run id, node id) -> {"site": the site state, "client": common.Client}


class Site:
    """One message's view of the site: the repository's modules, the run's args, the site's id and state."""

    def __init__(self, msg, context):
        import torch
        repo(context.node_config, context.run_config)
        import common
        import data as D
        import cli, federated, formats
        torch.set_num_threads(1)  # as common.setup: one thread per op
        self.common, self.D, self.context = common, D, context
        self.cli, self.federated, self.formats = cli, federated, formats
        self.cfg = msg.content["base"]
        self.payload = plain(msg.content)
        self.mod = method_module(self.cfg["method"])
        self.args = args_from_text(self.mod, self.cfg["args"])
        self.cid = int(self.cfg.get("cid", -1))
        path = context.node_config.get("data-path", "")
        self.path = str(path) if path else ""
        self.where = self.path or f"partition {context.node_config.get('partition-id', '?')}"

    def answer(self):
        """The reply to the message: federated.site_step for a shared step, else this app's own."""
        action, store = self.cfg["action"], self.context.state
        if KEPT_IN_PROCESS:
            state = self.kept.setdefault("site", {})
        else:
            state = unpack_site(store["fedsc.site"]) if "fedsc.site" in store else {}
        if action in ("hello", "read", "train", "embed", "finish"):
            reply = getattr(self, action)(state)
        else:
            if action == "bn_moments":  # the encoder the server's weights are loaded into
                state["net"] = self.model(state["x"].shape[1])["online"]
            reply = self.federated.site_step(state, action, self.payload)
            state.pop("net", None)
        if action != "train" and not KEPT_IN_PROCESS:
            store["fedsc.site"] = pack_site(state)
        return reply

    @property
    def kept(self):
        """This site's entry of KEPT (only the current run's are kept)."""
        key = (self.context.run_id, self.context.node_id)
        if key not in KEPT:
            KEPT.clear()
            KEPT[key] = {}
        return KEPT[key]

    def model(self, n_genes, weights=None):
        """The method's model (built without touching the torch RNG), with the modules in weights loaded."""
        import torch
        with torch.random.fork_rng():
            model = self.mod.make_model(n_genes, self.args)
        for key, state in unflat(weights or {}).items():
            model[key].load_state_dict(state)
        return model

    def hello(self, state):
        """SITE -> SERVER: what the server needs to match the sites: gene names, the file's sha256."""
        D, node = self.D, self.context.node_config
        if self.path:
            if not os.path.exists(self.path):
                raise SiteError("the file does not exist")
            found = {}
            D.read_counts(self.path, self.args.label_key or None, None, self.args.transpose, self.args.layer or None, found)
            barcodes = found.get("barcodes")
            if barcodes is not None and len(set(barcodes)) < len(barcodes):
                raise SiteError("duplicate cell barcodes")
            genes, sha, name = found.get("genes"), D.sha256sum(self.path), os.path.basename(self.path)
        else:
            genes, sha, name = None, D.sha256sum(D.resolve_data(self.args.data)), ""
        return {"name": name, "sha256": sha, "order": int(node.get("partition-id", -1)),
                "genes": None if genes is None else [str(g) for g in genes], "parts": int(node.get("num-partitions", -1))}

    def read(self, state):
        """SITE: reads its raw counts (cells x the server's shared genes when it named them), cell and gene
        names and label names per cell into its state; SITE -> SERVER: its label names."""
        import scipy.sparse as sp
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
            rows = parts[pid]
            counts, y = sp.csr_matrix(counts)[rows], None if y is None else y[rows]
        genes, barcodes = found.get("genes"), found.get("barcodes")
        if "genes" in self.cfg:  # the server's shared genes, by name, in its order
            if genes is None:
                raise SiteError("the file has no gene names, so its genes cannot be matched with the other sites'")
            where = dict(zip(np.asarray(genes).astype(str), range(len(genes))))
            cols = [where[g] for g in self.cfg["genes"]]
            if cols != list(range(len(genes))):
                counts = counts[:, cols]
            genes = np.array(self.cfg["genes"])
        cells = barcodes[rows] if barcodes is not None and not self.path else barcodes
        state.update(counts=counts, names=rows.astype(str) if cells is None else np.asarray(cells).astype(str),
                     gene_names=np.arange(counts.shape[1]).astype(str) if genes is None else np.asarray(genes).astype(str))
        if y is not None:
            state["labels"] = np.asarray(names[y]).astype(str)
        return {} if y is None else {"labels": sorted(set(state["labels"].tolist()))}

    def train(self, state):
        """CLIENT: download(global) -> local_update(lr) -> upload; replies the uploaded modules' weights
        and the cell count (and the round's log entries: loss, FedSC's mu and divergence)."""
        import torch
        x = torch.from_numpy(state["x"])
        global_state = unflat(self.payload)
        client = self.client(x, global_state)
        entry = self.mod.download(client, global_state, self.args)
        entry.update(self.mod.local_update(client, self.payload["lr"], self.args))
        weights, n = self.mod.upload(client)
        self.save_client(client)
        return {**{f"{m}.{k}": v for m, s in weights.items() for k, v in s.items()}, "num-examples": int(n),
                **{k: float(v) for k, v in entry.items()}}

    def client(self, x, global_state):
        """The client as it was after its last round; the first time, common.make_client's: the server's
        initial model (every module, as sent in round 0) and the generator seeded by the seed and its id."""
        import torch
        common, store = self.common, self.context.state
        if KEPT_IN_PROCESS and "client" in self.kept:
            return self.kept["client"]
        model = self.model(x.shape[1])
        if "fedsc.model" not in store:
            for key, module in model.items():
                module.load_state_dict(global_state[key])
            return common.make_client(self.cid, x, model, self.args.seed)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in unpack(store["fedsc.model"]).items()})
        tensors = unpack(store["fedsc.client_tensors"])
        gen = torch.Generator()
        gen.set_state(torch.from_numpy(tensors.pop("__generator__")))
        values = dict(store["fedsc.client_values"]) if "fedsc.client_values" in store else {}
        return common.Client(self.cid, x, model, gen, {**values, **{k: torch.from_numpy(v) for k, v in tensors.items()}})

    def save_client(self, client):
        import torch
        if KEPT_IN_PROCESS:
            self.kept["client"] = client
            return
        store = self.context.state
        tensors = {k: v for k, v in client.state.items() if isinstance(v, torch.Tensor)}
        values = {k: v for k, v in client.state.items() if k not in tensors}
        for k, v in values.items():
            if not isinstance(v, (bool, int, float, str)):
                raise SiteError(f"client.state['{k}'] is a {type(v).__name__}; only tensors and numbers can be kept")
        store["fedsc.model"] = pack(client.model.state_dict())
        store["fedsc.client_tensors"] = pack({"__generator__": client.gen.get_state(), **tensors})
        store["fedsc.client_values"] = ConfigRecord(values)

    def embed(self, state):
        """SITE: embeds its own cells with the server's final encoder (kept here, as state['h']) and turns its
        label names into the server's class numbers; SITE -> SERVER: its number of cells."""
        model = self.model(state["x"].shape[1], self.payload)
        args = copy.copy(self.args)
        args.bn_stats = "running"  # with --bn-stats recompute the server has already put the sites' statistics in
        state["h"] = self.common.embed(args, model, state["x"])
        if not np.isfinite(state["h"]).all():
            raise self.common.Diverged("the embedding holds NaN or inf values; try a smaller --lr")
        if "label_names" in self.payload:
            state["y"] = np.searchsorted(np.asarray(self.payload["label_names"]), state["labels"][state["cells"]])
        return {"n": len(state["h"])}

    def finish(self, state):
        """SITE: writes its own cells, annotated with their clusters, as an .h5ad (as save_run does);
        SITE -> SERVER: the file's path."""
        key, node, cfg = self.args.method.lower(), self.context.node_config, self.payload
        folder = os.path.join(node.get("out-dir", "") or self.cfg["out_dir"], "runs", cfg["run"])
        os.makedirs(folder, exist_ok=True)
        stem = os.path.basename(self.path).split(".")[0] if self.path else \
            f"{os.path.basename(self.args.data).split('.')[0]}_part{node['partition-id']}"
        path = os.path.join(folder, f"site{self.cid}_{stem}.h5ad")
        cells = state["cells"]
        columns = {f"{key}_cluster": state["clusters"]} | ({} if "labels" not in state else {"cell_type": state["labels"][cells]})
        self.formats.write_h5ad(path, state["x"], state["names"][cells], state["gene_names"][state["genes"]], columns,
                                {f"X_{key}": state["h"].astype(np.float32)}, {f"{key}_config": cfg["config"]})
        return {"path": os.path.abspath(path)}


def _reply(msg, **records):
    return Message(RecordDict(records), reply_to=msg)


def handle(msg: Message, context: Context) -> Message:
    """Every message: the site's answer, or its error as one line that names the site."""
    try:
        site = Site(msg, context)
    except SiteError as e:
        return _reply(msg, error=ConfigRecord({"error": str(e)}))
    try:
        return Message(content(site.answer()), reply_to=msg)
    except (SiteError, site.D.DataError) as e:
        return _reply(msg, error=ConfigRecord({"error": f"site {site.cid} ({site.where}): {e}"}))
    except site.common.Diverged as e:
        return _reply(msg, error=ConfigRecord({"diverged": f"site {site.cid} ({site.where}): {e}"}))


app.query()(handle)
app.train()(handle)
