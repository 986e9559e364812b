"""A Flower deployment on this machine, for the tests and the timing: one SuperLink and one SuperNode
per site as separate processes on 127.0.0.1 (insecure, free ports), `flwr run` against an explicit
connection to that SuperLink, polled with `flwr ls` until it finishes; every process is stopped by
its PID (with what it started) on the way out. Flower's files go to a temporary FLWR_HOME."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import time

APP = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(APP)


def flower_env(home):
    """No update check, nothing in the user's home, the repository's modules found, and the
    SuperNodes' task poll at 0.2 s instead of 1 s."""
    return dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_UPDATE_CHECK="1", FEDSC_REPO=ROOT, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([APP, ROOT]), FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2", RAY_DEDUP_LOGS="0")


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for_port(port, proc, timeout=120):
    """Until something listens on 127.0.0.1:port (the SuperLink is up), or proc has stopped."""
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {time.time() - t0:.0f} s")


def stop(proc):
    """Stop a process we started and everything it started (its own session), by its PID."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


class Deployment:
    """deployment.run(run_config) -> final status, e.g. 'finished:completed'."""

    def __init__(self, folder, procs, env, connection):
        self.folder, self.procs, self.env, self.connection = folder, procs, env, connection

    def flwr(self, *cmd):
        p = subprocess.run(["flwr", *cmd, "--format", "json"], env=self.env, cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        return json.loads(p.stdout[p.stdout.index("{"):]) if "{" in p.stdout else {"stderr": p.stderr}

    def run(self, run_config, timeout=1200):
        t0 = time.time()
        started = self.flwr("run", APP, self.connection, "--run-config", run_config)
        if not started.get("success"):
            raise RuntimeError(f"flwr run failed: {started}")
        status = ""
        while time.time() - t0 < timeout and not status.startswith("finished"):
            time.sleep(2)
            runs = self.flwr("ls", self.connection, "--run-id", str(started["run-id"])).get("runs", [])
            status = runs[0]["status"] if runs else ""
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a SuperLink or SuperNode stopped during the run; see the logs in " + str(self.folder))
        return status or "timeout"


@contextlib.contextmanager
def deployment(folder, node_configs):
    """A SuperLink and one SuperNode per node config (e.g. 'data-path="a.h5" out-dir="out_a"')."""
    os.makedirs(folder, exist_ok=True)
    home = os.path.join(folder, "flwr_home")
    os.makedirs(home, exist_ok=True)
    link, *nodes = free_ports(1 + len(node_configs))
    # an explicit connection to our own SuperLink (the default 'local' one starts a detached SuperLink)
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write(f'[superlink]\ndefault = "here"\n\n[superlink.here]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    env, procs, logs = flower_env(home), [], []

    def start(name, cmd):
        logs.append(open(os.path.join(folder, f"{name}.log"), "w"))
        procs.append(subprocess.Popen(cmd, env=env, cwd=folder, stdout=logs[-1], stderr=subprocess.STDOUT,
                                      start_new_session=True))

    try:
        start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
                            "--disable-runtime-dependency-installation"])
        wait_for_port(link, procs[0])  # SuperNodes with --max-retries 0 need it up
        for k, (config, port) in enumerate(zip(node_configs, nodes)):
            start(f"supernode{k}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                                    "--max-retries", "0", "--host", "127.0.0.1", "--port", str(port),
                                    "--node-config", config])
        yield Deployment(folder, procs, env, "here")
    finally:
        for p in procs:
            stop(p)
        for f in logs:
            f.close()


def main():
    """python flower/localhost.py SITE_FILE ... [--run-config '...'] [--out folder]: a whole
    deployment on this machine, one SuperNode per site file; prints the run's results row."""
    import argparse
    import csv
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("sites", nargs="+", help="one data file per site (any format --data reads)")
    p.add_argument("--run-config", default='method="fedsc"', help="flwr run --run-config, e.g. 'method=\"fedsc\" rounds=50'")
    p.add_argument("--out", default="flower-runs", help="the server's and the sites' outputs, and Flower's logs")
    p.add_argument("--timeout", type=int, default=24 * 3600)
    a = p.parse_args()
    out = os.path.abspath(a.out)
    for site in a.sites:
        if not os.path.exists(site):
            p.error(f"site file '{site}' does not exist")
    nodes = [f'data-path="{os.path.abspath(s)}" out-dir="{os.path.join(out, f"site{k}")}"' for k, s in enumerate(a.sites)]
    t0 = time.time()
    with deployment(os.path.join(out, "flower"), nodes) as d:
        status = d.run(f'{a.run_config} min-sites={len(a.sites)} out-dir="{os.path.join(out, "server")}"', timeout=a.timeout)
    print(f"status {status} after {time.time() - t0:.0f} s; Flower's logs in {os.path.join(out, 'flower')}")
    results = os.path.join(out, "server", "results.csv")
    if status != "finished:completed" or not os.path.exists(results):
        raise SystemExit(1)
    row = list(csv.DictReader(open(results)))[-1]
    print("  ".join(f"{k} {row[k]}" for k in ("method", "rounds", "lr", "ari", "nmi", "sil_simplified", "seconds") if k in row))


if __name__ == "__main__":
    main()
