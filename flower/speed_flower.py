"""Seconds per round of one method, side by side in one run: the in-process loop (common.federate),
Flower's simulation engine (Ray) and a deployment on this machine (a SuperLink and one SuperNode per
site, separate processes on 127.0.0.1), once with Flower's default ClientApp process per message and
once with a long-lived worker per site. Training only (evaluate=false); the same data, partition,
seed and protocol (--preprocess federated) in all four.

    python flower/speed_flower.py [--rounds 3] [--data 10X_PBMC] [--method fedsc] [--out folder]

The deployment's sites are the in-process partition written by split.py's rule, one file per site."""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

APP = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(APP)
sys.path[:0] = [APP, ROOT]
import localhost  # noqa: E402

SIMULATE = """
import sys
from flwr.simulation import run_simulation
from fedsc_flower import client_app, server_app
run_simulation(server_app=server_app.make_app({"method": sys.argv[1], "rounds": int(sys.argv[2]), "data": sys.argv[3],
                                              "out-dir": sys.argv[4], "evaluate": False, "min-sites": int(sys.argv[5])}),
               client_app=client_app.app, num_supernodes=int(sys.argv[5]),
               backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0},
                               "init_args": {"num_cpus": 2, "include_dashboard": False}})
"""


def per_round(folder):
    """Seconds of each round from a Flower run's rounds.csv (one value per round)."""
    import pandas as pd
    runs = os.path.join(folder, "runs")
    log = pd.read_csv(os.path.join(runs, sorted(os.listdir(runs))[-1], "rounds.csv"))
    return log.groupby("round")["seconds"].first().tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="fedsc")
    p.add_argument("--data", default="10X_PBMC")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--out", default="")
    p.add_argument("--no-publish", dest="publish", action="store_false",
                   help="print only; by default results/speed_flower.md and the README block are written")
    a = p.parse_args()
    import common
    import cli, formats
    import data as D
    out = a.out or tempfile.mkdtemp(prefix="speed_flower_")
    load_before = os.getloadavg()[0]
    env = localhost.flower_env(os.path.join(out, "flwr_home"))
    times = {}
    # in process: the method file itself, --preprocess federated, one client at a time
    r = subprocess.run([sys.executable, os.path.join(ROOT, f"{a.method}.py"), "--data", a.data, "--rounds", str(a.rounds),
                        "--clients", str(a.clients), "--preprocess", "federated", "--evaluate", "federated",
                        "--out", os.path.join(out, "inprocess", "results.csv")], env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    times["in-process loop (common.federate)"] = [float(s) for s in re.findall(r"^round \d+/\d+ .*  ([\d.]+)s$", r.stdout, re.M)]
    # Flower's simulation engine: the SuperNodes partition the same file by their partition-id
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", SIMULATE, a.method, str(a.rounds), a.data, os.path.join(out, "simulation"),
                        str(a.clients)], env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    times["Flower simulation (Ray, run_simulation)"] = per_round(os.path.join(out, "simulation"))
    sim_wall = time.time() - t0
    # a deployment: one file per site (the same partition), one SuperNode each
    path = D.resolve_data(a.data)
    found = {}
    X, y, names, _ = D.read_counts(path, names=found)
    args = common.parse_args(__import__(a.method).Args, ["--data", a.data, "--clients", str(a.clients)])
    cli.resolve(args, os.path.join(ROOT, f"{a.method}.py"))
    parts = D.partition(y, a.clients, "class", args.types_per_client, seed=args.seed)
    genes = found.get("genes", [f"gene{i}" for i in range(X.shape[1])])
    files = []
    for k, idx in enumerate(parts):
        files.append(formats.write_h5(os.path.join(out, f"site{k}.h5"), X[idx], Y=y[idx], label_names=names,
                                gene_names=genes, cell_names=[f"c{i}" for i in idx]))
    extra = f"--n-genes {args.n_genes}"  # the benchmark's HVG count (site files are not recognised as the benchmark)
    for worker, name in ((False, "a new flwr-clientapp process per message (Flower's default)"),
                         (True, "a long-lived worker per site (fedsc_flower/worker.py)")):
        folder = os.path.join(out, f"deployment_{'worker' if worker else 'default'}")
        nodes = [f'data-path="{f}" out-dir="{folder}"' for f in files]
        with localhost.deployment(os.path.join(folder, "flower"), nodes, worker=worker) as flower:
            status = flower.run(f'method="{a.method}" rounds={a.rounds} min-sites={a.clients} evaluate=false '
                                f'out-dir="{folder}" args="{extra}"', timeout=3600)
        if status != "finished:completed":
            sys.exit(f"the deployment ended with status {status}; logs in {os.path.join(folder, 'flower')}")
        times[f"Flower deployment, {a.clients} SuperNodes on 127.0.0.1: {name}"] = per_round(folder)
    load = os.getloadavg()[0]
    lines = [f"{a.method} on {a.data}, {a.clients} clients, {a.rounds} rounds, paper protocol otherwise, training only; "
             f"`python flower/speed_flower.py --rounds {a.rounds}`; load average {load_before:.1f} on {os.cpu_count()} CPUs "
             f"before, {load:.1f} at the end (the deployments' own processes count):", "",
             "| runtime | seconds per round (each round) | mean of rounds 2.. | x the in-process round |", "|---|---|---|---|"]
    mean = {name: sum(t[1:] or t) / len(t[1:] or t) for name, t in times.items()}
    loop = mean["in-process loop (common.federate)"]
    for name, t in times.items():
        lines.append(f"| {name} | {' / '.join(f'{x:.2f}' for x in t)} | {mean[name]:.2f} | {mean[name] / loop:.1f} |")
    md = "\n".join(lines)
    print(md)
    print(json.dumps({"times": times, "simulation_wall_seconds": sim_wall, "load": load, "out": out}))
    if a.publish:
        import benchmark
        benchmark.publish("speed_flower", md, "flower/speed_flower.py")


if __name__ == "__main__":
    main()
