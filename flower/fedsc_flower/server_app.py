"""ServerApp: the method file's aggregate, the run's rounds, lr schedule (common.learning_rate) and
seed from the run config, and the SERVER functions of federated.py (server_preprocess, server_bn,
server_metrics), the same as in process, whose questions to the sites go out as messages (Sites):
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
from flwr.superlink.grid import http_grid

from fedsc_flower import waits
from fedsc_flower.records import DEFAULTS, SiteError, args_to_text, config, content, flat, method_module, plain, repo, unflat

waits.shorten(http_grid)  # the replies' weights: retried after 0.02 s, not 1 s


class Sites:
    """The server's side of the conversation: one message to every site, the replies in site order."""

    def __init__(self, grid, nodes, base, timeout):
        self.grid, self.nodes, self.base, self.timeout, self.sent = grid, nodes, base, timeout, 0

    def ask(self, action, **payload):
        """federated's sites interface: payload (a plain dict) to every site as a message, their replies as
        plain dicts in site order; a site's error stops the run with its own message."""
        body, msgs = content(payload), []
        for cid, node in enumerate(self.nodes):
            records = RecordDict({**body, "base": config(**self.base, cid=cid, action=action)})
            msgs.append(Message(records, dst_node_id=node, message_type="train" if action == "train" else "query",
                                group_id=f"{action}{self.sent}"))
        self.sent += 1
        replies = {r.metadata.src_node_id: r for r in self.send_and_receive(msgs)}
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
            out.append(plain(r.content))
        return out

    def send_and_receive(self, msgs):
        """grid.send_and_receive, asking for the replies after waits.Backoff's waits up to waits.SERVER_POLL s
        (Flower's deployment grid waits 3 s): a round ends soon after its slowest site answers."""
        waiting, replies, t0 = set(self.grid.push_messages(msgs)), [], time.time()
        backoff = waits.Backoff(cap=waits.SERVER_POLL)
        while waiting and time.time() - t0 < self.timeout:
            new = list(self.grid.pull_messages(waiting))
            replies += new
            waiting -= {r.metadata.reply_to_message_id for r in new}
            if waiting:
                backoff.wait()
        return replies


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
    if args.anchor:
        raise SiteError("run config: --anchor is offered in process (the method scripts), not on Flower yet")
    args.clients, args.preprocess, args.evaluate = n_sites, "federated", "federated"
    args.out = os.path.join(str(run_config["out-dir"]), "results.csv")
    cli.check_args(args)
    return mod, args


# ---------------------------------------------------------------------------------------------
# Preprocessing: which genes the sites share (load_sites' rules), then federated.server_preprocess
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
        if any(h["sha256"] != digest for h in hello):
            raise SiteError(f"the SuperNodes read different files under --data {args.data}; give every one the same file")
        cli.check_benchmark(args.data, digest, "the SuperNodes' file")  # as cli.resolve in process
        cli.benchmark_defaults(args, digest)
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
    federated.check_shared_genes(len(genes), [len(h["genes"]) for h in hello])  # as load_sites in process
    print(f"genes: {len(genes)} shared by all sites; dropped per site: "
          f"{[int((~np.isin(h['genes'], genes)).sum()) for h in hello]}", flush=True)
    return [str(g) for g in genes]


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
    hello = sites.ask("hello")
    # site order: partition-id when given, then the file's name (a site's id seeds its generator)
    order = sorted(range(len(nodes)), key=lambda i: (int(hello[i]["order"]) if int(hello[i]["order"]) >= 0 else math.inf,
                                                     str(hello[i]["name"]), nodes[i]))
    sites.nodes, hello = [nodes[i] for i in order], [hello[i] for i in order]
    shared = match_sites(sites, args, hello)
    args.code = runs.code_hash(sys.modules[mod.__name__].__file__)
    sites.base = dict(base, args=args_to_text(args), **({} if shared is None else {"genes": shared}))
    print(f"config {json.dumps(vars(args))}", flush=True)
    labels = [r.get("labels") for r in sites.ask("read")]  # each site's label names, or none
    if any(l is None for l in labels) and not all(l is None for l in labels):
        raise SiteError(f"sites {[k for k, l in enumerate(labels) if l is None]} have no labels, others do")
    if labels[0] is not None:
        federated.check_site_labels([np.unique(np.asarray(l).astype(str)) for l in labels])  # one vocabulary
    label_names = None if labels[0] is None else [str(x) for x in np.unique(np.concatenate(labels))]
    if label_names is None and args.n_clusters < 1:
        raise SiteError("the sites have no cell-type labels: pass --n-clusters (run config args) to choose k")
    genes, cells = federated.server_preprocess(sites, args.n_genes)  # SERVER: the same steps as in process
    for cid, n in enumerate(cells):
        if n < 2:
            raise SiteError(f"site {cid} holds {n} non-empty cell(s); every site needs at least 2")
        print(f"site {cid}: {n} cells", flush=True)
    n_genes = len(genes)
    k = args.n_clusters or len(label_names)
    common.seed_everything(args.seed)
    model = mod.make_model(n_genes, args)  # the server's initial global model (seeded, as the scripts)
    global_state = {key: common.weights(module) for key, module in model.items()}  # round 0: every module
    log, t_train, metrics = [], time.time(), {}
    try:  # a diverged run (its loss, a site's step or a site's embedding not finite) is a result: its row records it
        for rnd in range(args.rounds):
            t0, lr = time.time(), common.learning_rate(args, rnd)
            replies = sites.ask("train", lr=lr, round=rnd, **flat(global_state))
            uploads = [(unflat(r), int(r["num-examples"])) for r in replies]
            global_state = mod.aggregate(uploads)  # SERVER: only weights and counts arrive
            logs = [{k: v for k, v in r.items() if "." not in k and k != "num-examples"} for r in replies]
            log += [{"round": rnd + 1, "client": c, "lr": lr, **e, "seconds": time.time() - t0} for c, e in enumerate(logs)]
            loss = float(np.mean([e["loss"] for e in logs]))
            if not math.isfinite(loss):
                raise common.Diverged(f"round {rnd + 1}: the loss is {loss}; try a smaller --lr")
            line = f"round {rnd + 1}/{args.rounds}  loss {loss:.4f}  lr {lr:.4f}"
            for key in sorted({k for e in logs for k in e} - {"loss"}):
                line += f"  {key} " + "/".join(f"{e[key]:.3f}" for e in logs if key in e)
            if args.eval_every and (rnd + 1) % args.eval_every == 0 and rnd + 1 < args.rounds and run_config["evaluate"]:
                m = evaluate(sites, args, global_state, label_names, k)  # as the final evaluation, at the sites
                line += "".join(f"  {key} {m[key]:.2f}" for key in ("ari", "sil_simplified", "erank") if key in m)
            print(line + f"  {time.time() - t0:.2f}s", flush=True)
        seconds = time.time() - t_train
        print(f"trained {args.rounds} rounds in {seconds:.1f}s", flush=True)
        if run_config["evaluate"]:
            metrics = evaluate(sites, args, global_state, label_names, k)
    except common.Diverged:
        save(args, runs.run_folder(args), global_state, log, {}, [], "diverged", t_start, time.time() - t_train)
        raise
    folder, files = runs.run_folder(args), []
    if run_config["evaluate"]:
        files = [r["path"] for r in sites.ask("finish", run=os.path.basename(folder), config=json.dumps(vars(args)))]
        print("final  " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()) + f"  time {time.time() - t_start:.1f}s", flush=True)
    save(args, folder, global_state, log, metrics, files, "ok", t_start, seconds)
    return metrics


def evaluate(sites, args, global_state, label_names, k):
    """Each site embeds its own cells with the global encoder (its BatchNorm statistics recomputed
    from the sites' sums with --bn-stats recompute); federated KMeans and scores from site sums."""
    import torch
    import federated
    state = global_state  # global.pt keeps the trained weights; evaluation may use other BN statistics
    if getattr(args, "bn_stats", "running") == "recompute":
        online = federated.server_bn(sites, {key: v.numpy() for key, v in global_state["online"].items()})
        state = {**global_state, "online": {key: torch.from_numpy(v) for key, v in online.items()}}
    sites.ask("embed", label_names=label_names, **flat(state))  # each site embeds its own cells
    return federated.server_metrics(sites, k, args.seed, None if label_names is None else len(label_names))


def save(args, folder, global_state, log, metrics, files, status, t_start, seconds):
    """The run's folder (global.pt, rounds.csv, result.json) and its row in --out; status ok or diverged."""
    import pandas as pd
    import torch
    import formats, runs
    formats.write_atomic(os.path.join(folder, "global.pt"), lambda tmp: torch.save(global_state, tmp))
    formats.write_atomic(os.path.join(folder, "rounds.csv"), lambda tmp: pd.DataFrame(log).to_csv(tmp, index=False))
    row = {**vars(args), **metrics, "status": status, "seconds": round(time.time() - t_start, 2),
           "train_seconds": round(seconds, 2), "torch": torch.__version__, "commit": runs.git_commit(),
           "config_id": runs.config_id(args), "run": os.path.basename(folder), "runtime": "flower",
           "site_files": json.dumps(files)}
    formats.write_atomic(os.path.join(folder, "result.json"), lambda tmp: json.dump(row, open(tmp, "w"), indent=1))
    runs.append_row(args.out, row)
    print(f"wrote a row to {args.out} and the run's files to {folder}"
          + (f"; each site wrote its own cells: {', '.join(files)}" if files else ""), flush=True)


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
