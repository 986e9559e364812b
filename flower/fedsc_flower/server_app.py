"""ServerApp: the method file's aggregate, the run's rounds, lr schedule (common.learning_rate) and
seed from the run config, and the SERVER steps of federated.preprocess_federated and
federated.federated_metrics, each site's part asked for by a message (statistics in, decisions out):
no cell, no embedding and no per-cell label ever reaches the server.

Run config (pyproject.toml): method, rounds, seed, lr-schedule, args (any other option of the method
file), data (simulation), min-sites, out-dir, repo-path, timeout, evaluate."""
import json
import math
import os
import shlex
import sys
import time

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsc_flower.records import DEFAULTS, SiteError, args_to_text, config, method_module, pack, pack_state, repo, unpack, unpack_state

N_INIT, MAX_ITER = 10, 300  # federated.federated_kmeans' restarts and federated_lloyd's iterations
BISECT_DEPTH = 12            # levels of the median's bisection asked for in one message (4095 thresholds)


class Sites:
    """The server's side of the conversation: one message to every site, the replies in site order."""

    def __init__(self, grid, nodes, base, timeout):
        self.grid, self.nodes, self.base, self.timeout, self.sent = grid, nodes, base, timeout, 0

    def ask(self, action, arrays=None, per_site=None, **values):
        """Send action to every site (message type query.<action>, or train) and return the replies'
        records in site order; a site's error stops the run with its own message."""
        msgs = []
        for cid, node in enumerate(self.nodes):
            content = RecordDict({"config": config(**self.base, cid=cid, **values, **((per_site or {}).get(cid, {})))})
            if arrays is not None:
                content["arrays"] = arrays
            kind = "train" if action == "train" else f"query.{action}"
            msgs.append(Message(content, dst_node_id=node, message_type=kind, group_id=f"{action}{self.sent}"))
        self.sent += 1
        replies = {r.metadata.src_node_id: r for r in self.grid.send_and_receive(msgs, timeout=self.timeout)}
        out = []
        for cid, node in enumerate(self.nodes):
            r = replies.get(node)
            if r is None:
                raise SiteError(f"site {cid} did not answer '{action}' within {self.timeout} s")
            if r.has_error():
                raise RuntimeError(f"site {cid} failed on '{action}': {r.error.reason}")
            if "error" in r.content:
                err = r.content["error"]
                if "diverged" in err:
                    import common
                    import cli, federated, formats, runs
                    raise common.Diverged(err["diverged"])
                raise SiteError(err["error"])
            out.append(r.content)
        return out


def wait_for_sites(grid, n, timeout):
    t0 = time.time()
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if time.time() - t0 > timeout:
            raise SiteError(f"only {len(nodes)} SuperNode(s) connected after {timeout} s; the run needs min-sites={n}")
        time.sleep(1)
    return nodes


def make_args(run_config, n_sites):
    """The method's Args from the run config, checked as the scripts check their command line."""
    import common
    import cli, federated, formats, runs
    mod = method_module(run_config["method"])
    argv = ["--data", str(run_config["data"]), "--rounds", str(run_config["rounds"]), "--seed", str(run_config["seed"]),
            "--lr-schedule", str(run_config["lr-schedule"])] + shlex.split(str(run_config["args"]))
    try:
        args = common.parse_args(mod.Args, argv)
    except SystemExit:  # argparse printed what is wrong
        raise SiteError(f"run config: bad options {' '.join(argv)}") from None
    args.clients, args.preprocess, args.evaluate = n_sites, "federated", "federated"
    args.out = os.path.join(str(run_config["out-dir"]), "results.csv")
    cli.check_args(args)
    return mod, args


# ---------------------------------------------------------------------------------------------
# Preprocessing: federated.preprocess_federated's SERVER steps
# ---------------------------------------------------------------------------------------------
def match_sites(sites, args, hello):
    """load_sites' rules: genes matched by name (their intersection, in the first site's order)."""
    import data as D
    import cli, federated, formats, runs
    by_file = [h["name"] != "" for h in hello]
    if any(by_file) and not all(by_file):
        raise SiteError("some SuperNodes have node config data-path and others not; give every site its file")
    if not all(by_file):  # simulation: the SuperNodes partition one file
        if any(int(h["order"]) < 0 for h in hello) or sorted(int(h["order"]) for h in hello) != list(range(len(hello))):
            raise SiteError("without data-path every SuperNode needs partition-id 0..K-1 (simulation)")
        digest = hello[0]["sha256"]
        bench = next((b for b in D.BENCHMARKS.values() if b["sha256"] == digest), {})
        args.n_genes = args.n_genes or bench.get("n_genes", D.DEFAULT_N_GENES)
        if not args.types_per_client and "types_per_client" in bench:
            args.types_per_client = bench["types_per_client"]
        args.data_sha256 = digest[:16]
        return None
    import hashlib
    args.sites = [h["name"] for h in hello]
    args.data_sha256 = hashlib.sha256("".join(h["sha256"] for h in hello).encode()).hexdigest()[:16]
    args.n_genes = args.n_genes or D.DEFAULT_N_GENES
    if len(hello) == 1:
        return None
    for cid, h in enumerate(hello):
        if "genes" not in h:
            raise SiteError(f"site {cid} ({h['name']}) has no gene names, so its genes cannot be matched with the other sites'")
    genes = np.asarray(hello[0]["genes"])
    for h in hello[1:]:
        genes = genes[np.isin(genes, h["genes"])]
    if len(genes) == 0:
        raise SiteError("the sites share no gene name; check that they use the same gene naming")
    print(f"genes: {len(genes)} shared by all sites; dropped per site: "
          f"{[int((~np.isin(h['genes'], genes)).sum()) for h in hello]}", flush=True)
    return [str(g) for g in genes]


def median_library_size(sites, genes, n, hi):
    """federated.federated_kth, unchanged, for the median; each message asks the sites for the next
    BISECT_DEPTH levels of the bisection at once (a cache: the answers are the same counts)."""
    import data as D
    import cli, federated, formats, runs
    cache = {}

    def kth(k):
        interval = [0, hi]

        def first_site(t):  # federated_kth asks site 0 first, then the others for the same t
            if t not in cache:
                ts, frontier = [], [tuple(interval)]
                for _ in range(BISECT_DEPTH):
                    nxt = []
                    for a, b in frontier:
                        if a < b:
                            m = (a + b) // 2
                            ts.append(m)
                            nxt += [(a, m), (m + 1, b)]
                    frontier = nxt
                ts = [x for x in (ts if t in ts else [t]) if x not in cache]
                replies = sites.ask("count", thresholds=[int(x) for x in ts])
                for i, x in enumerate(ts):
                    cache[x] = [int(r["reply"]["counts"][i]) for r in replies]
            if sum(cache[t]) >= k:  # follow the bisection, to know which levels to ask for next
                interval[1] = t
            else:
                interval[0] = t + 1
            return cache[t][0]

        others = [lambda t, i=i: cache[t][i] for i in range(1, len(sites.nodes))]
        return federated.federated_kth([first_site] + others, k, hi)

    median = kth((n + 1) // 2)
    if n % 2 == 0:
        median = (median + kth(n // 2 + 1)) / 2
    return median


def preprocess(sites, args):
    """federated.preprocess_federated, its SITE steps on the sites: returns the number of HVGs."""
    import data as D
    import cli, federated, formats, runs
    replies = sites.ask("totals")
    labelled = ["labels" in r["reply"] for r in replies]
    if any(labelled) and not all(labelled):
        raise SiteError(f"sites {[k for k, l in enumerate(labelled) if not l]} have no labels, others do")
    label_names = np.unique(np.concatenate([r["reply"]["labels"] for r in replies])) if all(labelled) else None
    if label_names is None and args.n_clusters < 1:
        raise SiteError("the sites have no cell-type labels: pass --n-clusters (run config args) to choose k")
    totals = [unpack(r["arrays"])["totals"] for r in replies]
    genes = np.flatnonzero(sum(totals) >= 1)  # SERVER: the non-empty genes
    kept = pack({"genes": genes})
    n = sum(int(r["reply"]["n"]) for r in replies)
    if n < 2 or len(genes) < 2:
        raise SiteError(f"after removing empty cells/genes only {n} cells x {len(genes)} genes are left")
    hi = int(sum(t.sum() for t in totals))  # an aggregate bound: the sum of all counts
    median = median_library_size(sites, kept, n, hi)
    replies = sites.ask("moments", arrays=kept, median=float(median))
    n_all, mean, m2 = federated.merge_moments([(int(r["reply"]["n"]), *(unpack(r["arrays"])[k] for k in ("mean", "m2"))) for r in replies])
    hvg = D.hvg_from_moments(mean, m2 / (n_all - 1), args.n_genes)
    with_hvg = pack({"genes": genes, "hvg": hvg})
    replies = sites.ask("log_moments", arrays=with_hvg, median=float(median))
    _, mean, m2 = federated.merge_moments([(int(r["reply"]["n"]), *(unpack(r["arrays"])[k] for k in ("mean", "m2"))) for r in replies])
    std = np.sqrt(m2 / (n_all - 1))
    std[std == 0] = 1
    replies = sites.ask("scale", arrays=pack({"genes": genes, "hvg": hvg, "mean": mean, "std": std}), median=float(median))
    for cid, r in enumerate(replies):
        print(f"site {cid}: {int(r['reply']['n'])} cells", flush=True)
    return int(hvg.sum()), label_names


# ---------------------------------------------------------------------------------------------
# Evaluation: federated.recompute_bn, federated_kmeans / federated_lloyd / federated_metrics' SERVER steps
# ---------------------------------------------------------------------------------------------
def recompute_bn(sites, global_state):
    """--bn-stats recompute (federated.recompute_bn): for each BatchNorm layer of the online encoder, in
    order, the sites send per-feature (n, sum, sum of squares) of its input under the encoder as
    recomputed so far; the server merges them into the layer's running mean and variance. The
    layers are read off the state's keys (a BatchNorm layer is what has a running mean), in the
    order the encoder's modules were registered, which is the order of its forward pass."""
    import torch
    import common
    import cli, federated, formats, runs
    state = {k: v.clone() for k, v in global_state["online"].items()}
    for name in [k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")]:
        replies = sites.ask("bn_moments", arrays=pack_state({"online": state}), layer=name)
        parts = [(int(r["reply"]["n"]), torch.from_numpy(p["sum"]), torch.from_numpy(p["sumsq"]))
                 for r in replies for p in [unpack(r["arrays"])]]
        mean, var = federated.merge_bn_moments(parts)
        state[f"{name}.running_mean"] = mean.to(state[f"{name}.running_mean"].dtype)
        state[f"{name}.running_var"] = var.to(state[f"{name}.running_var"].dtype)
    return {**global_state, "online": state}


def evaluate(sites, args, global_state, k, label_names, run):
    """KMeans from per-cluster sums and counts (the N_INIT restarts' Lloyd iterations in lockstep, so
    one message serves every restart still running), ARI/NMI from the summed contingency table,
    Calinski-Harabasz from sums, the simplified silhouette; the sites write their own cells."""
    import common
    import cli, federated, formats, runs
    from sklearn.cluster import kmeans_plusplus
    replies = sites.ask("embed", arrays=pack_state(global_state), k=k)
    parts = [unpack(r["arrays"]) for r in replies]
    scatter = [(int(r["reply"]["n"]), p["mean"], p["scatter"]) for r, p in zip(replies, parts)]
    out = {"erank": federated.rank_from_scatter(federated.merge_scatter(scatter)[2])}
    local = np.concatenate([p["centroids"] for p in parts])
    weights = np.concatenate([p["sizes"] for p in parts]).astype(float)
    rng = np.random.RandomState(args.seed)
    cent = {r: kmeans_plusplus(local, k, sample_weight=weights, random_state=rng)[0] for r in range(N_INIT)}
    running, done, it, first = list(range(N_INIT)), {}, 0, True
    while running:
        replies = sites.ask("assign", arrays=pack({"centroids": np.stack([cent[r] for r in running])}),
                            restarts=running, first=first, n_init=N_INIT)
        sent = [unpack(r["arrays"]) for r in replies]
        it, first = it + 1, False
        for r in list(running):
            sums, counts = sum(s[f"sums{r}"] for s in sent), sum(s[f"counts{r}"] for s in sent)
            inertia = sum(float(s[f"inertia{r}"]) for s in sent)
            if sum(int(s[f"changed{r}"]) for s in sent) == 0:
                done[r] = inertia
            else:
                cent[r] = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], cent[r])
                if it == MAX_ITER:
                    done[r] = inertia
            if r in done:
                running.remove(r)
    best = None
    for r in range(N_INIT):  # the lowest summed inertia; the first one on ties (federated_kmeans)
        if best is None or done[r] < done[best]:
            best = r
    inertia = done[best]
    names = [] if label_names is None else [str(x) for x in label_names]
    replies = sites.ask("finish", arrays=pack({"centroids": cent[best]}), best=best, label_names=names,
                        run=run, config=json.dumps(vars(args)))
    fin = [unpack(r["arrays"]) for r in replies]
    n = sum(s[0] for s in scatter)
    if label_names is not None:
        out["ari"], out["nmi"] = federated.scores_from_contingency(sum(f["table"] for f in fin))
    counts = sum(f["counts"] for f in fin)
    mean = sum(p["sum"] for p in parts) / n
    c = cent[best]
    between = (counts * ((c - mean) ** 2).sum(1)).sum()
    out["ch"] = between / (k - 1) / (inertia / (n - k)) if inertia > 0 and (counts > 0).sum() > 1 else float("nan")
    out["sil_simplified"] = 100 * sum(float(f["sil"]) for f in fin) / n
    return out, [str(r["reply"]["path"]) for r in replies]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def run(grid, run_config):
    import torch
    import common
    import cli, federated, formats, runs
    import data as D
    t_start = time.time()
    torch.set_num_threads(1)
    nodes = wait_for_sites(grid, int(run_config["min-sites"]), float(run_config["timeout"]))
    mod, args = make_args(run_config, len(nodes))
    base = dict(method=str(run_config["method"]), out_dir=str(run_config["out-dir"]))
    sites = Sites(grid, nodes, dict(base, args=args_to_text(args)), float(run_config["timeout"]))
    hello = [r["reply"] for r in sites.ask("hello")]
    # site order: partition-id when given, then the file's name (a site's id seeds its generator)
    order = sorted(range(len(nodes)), key=lambda i: (int(hello[i]["order"]) if int(hello[i]["order"]) >= 0 else math.inf,
                                                     str(hello[i]["name"]), nodes[i]))
    sites.nodes, hello = [nodes[i] for i in order], [hello[i] for i in order]
    shared = match_sites(sites, args, hello)
    args.code = runs.code_hash(sys.modules[mod.__name__].__file__)
    sites.base = dict(base, args=args_to_text(args), **({} if shared is None else {"genes": shared}))
    print(f"config {json.dumps(vars(args))}", flush=True)
    n_genes, label_names = preprocess(sites, args)
    k = args.n_clusters or len(label_names)
    common.seed_everything(args.seed)
    model = mod.make_model(n_genes, args)  # the server's initial global model (seeded, as the scripts)
    global_state = {key: common.weights(module) for key, module in model.items()}  # round 0: every module
    log, t_train = [], time.time()
    for rnd in range(args.rounds):
        t0, lr = time.time(), common.learning_rate(args, rnd)
        replies = sites.ask("train", arrays=pack_state(global_state), lr=lr, round=rnd)
        uploads = [(unpack_state(r["arrays"]), int(r["metrics"]["num-examples"])) for r in replies]
        global_state = mod.aggregate(uploads)  # SERVER: only weights and counts arrive
        logs = [{k: v for k, v in r["metrics"].items() if k != "num-examples"} for r in replies]
        log += [{"round": rnd + 1, "client": c, "lr": lr, **e, "seconds": time.time() - t0} for c, e in enumerate(logs)]
        loss = float(np.mean([e["loss"] for e in logs]))
        if not math.isfinite(loss):
            raise common.Diverged(f"round {rnd + 1}: the loss is {loss}; try a smaller --lr")
        line = f"round {rnd + 1}/{args.rounds}  loss {loss:.4f}  lr {lr:.4f}"
        for key in sorted({k for e in logs for k in e} - {"loss"}):
            line += f"  {key} " + "/".join(f"{e[key]:.3f}" for e in logs if key in e)
        print(line + f"  {time.time() - t0:.2f}s", flush=True)
    seconds = time.time() - t_train
    print(f"trained {args.rounds} rounds in {seconds:.1f}s", flush=True)
    folder = runs.run_folder(args)
    name = os.path.basename(folder)
    metrics, files = {}, []
    if run_config["evaluate"]:
        state = global_state  # global.pt keeps the trained weights; evaluation may use other BN statistics
        if getattr(args, "bn_stats", "running") == "recompute":
            state = recompute_bn(sites, global_state)
        metrics, files = evaluate(sites, args, state, k, label_names, name)
        print("final  " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()) + f"  time {time.time() - t_start:.1f}s", flush=True)
    import pandas as pd
    formats.write_atomic(os.path.join(folder, "global.pt"), lambda tmp: torch.save(global_state, tmp))
    formats.write_atomic(os.path.join(folder, "rounds.csv"), lambda tmp: pd.DataFrame(log).to_csv(tmp, index=False))
    row = {**vars(args), **metrics, "status": "ok", "seconds": round(time.time() - t_start, 2),
           "train_seconds": round(seconds, 2), "torch": torch.__version__, "commit": runs.git_commit(),
           "config_id": runs.config_id(args), "run": name, "runtime": "flower", "site_files": json.dumps(files)}
    formats.write_atomic(os.path.join(folder, "result.json"), lambda tmp: json.dump(row, open(tmp, "w"), indent=1))
    runs.append_row(args.out, row)
    print(f"wrote a row to {args.out} and the run's files to {folder}"
          + (f"; each site wrote its own cells: {', '.join(files)}" if files else ""), flush=True)
    return metrics


def make_app(overrides=None):
    """A ServerApp whose run config is DEFAULTS < the run's config < overrides (run_simulation
    passes no run config, so its callers give theirs here)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = {**DEFAULTS, **dict(context.run_config), **(overrides or {})}
        try:
            repo(run_config)
            run(grid, run_config)
        except SiteError as e:
            msg = str(e)
            print(msg if msg.startswith("error:") else f"error: {msg}", file=sys.stderr, flush=True)
            raise
        except Exception as e:  # a data error or a diverged run: one line, and the run fails
            if type(e).__name__ in ("DataError", "Diverged"):
                print(f"{'error' if type(e).__name__ == 'DataError' else 'diverged'}: {e}", file=sys.stderr, flush=True)
            raise

    return app


app = make_app()
