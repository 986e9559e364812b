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
import sys
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
        status, wait = "", 1.0
        while time.time() - t0 < timeout and not status.startswith("finished"):
            wait = min(wait * 1.5, 5)  # each `flwr ls` is a new process (about a CPU-second): asked less often as a run goes on
            time.sleep(wait)
            runs = self.flwr("ls", self.connection, "--run-id", str(started["run-id"])).get("runs", [])
            status = runs[0]["status"] if runs else ""
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a SuperLink or SuperNode stopped during the run; see the logs in " + str(self.folder))
        return status or "timeout"


def certificates(folder):
    """TLS for a SuperLink on 127.0.0.1: a CA and the SuperLink's certificate signed by it (valid one day).
    Returns {"ca": ..., "cert": ..., "key": ...}, PEM file paths."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, key, issuer, issuer_key, *extensions):
        name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    ca = certificate("fedsc test CA", ca_key, "fedsc test CA", ca_key, (x509.BasicConstraints(ca=True, path_length=None), True))
    cert = certificate("127.0.0.1", key, "fedsc test CA", ca_key,
                       (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                     x509.DNSName("localhost")]), False))
    paths = {name: os.path.join(folder, f"{name}.pem") for name in ("ca", "cert", "key")}
    for name, data in (("ca", ca.public_bytes(serialization.Encoding.PEM)), ("cert", cert.public_bytes(serialization.Encoding.PEM)),
                       ("key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                                 serialization.NoEncryption()))):
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


def node_key(folder, name):
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format, as Flower reads it): (private, public) paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = os.path.join(folder, name), os.path.join(folder, f"{name}.pub")
    with open(private, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    with open(public, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


@contextlib.contextmanager
def deployment(folder, node_configs, worker=True, secure=False):
    """A SuperLink and one SuperNode per node config (e.g. 'data-path="a.h5" out-dir="out_a"'); with worker,
    each SuperNode with process isolation and its long-lived ClientApp process (fedsc_flower/worker.py),
    else Flower's default: a new flwr-clientapp process per message. secure: TLS (certificates above)
    between every process and the SuperLink, and SuperNode authentication: the SuperLink admits only the
    SuperNodes whose public keys were registered (`flwr supernode register`); deployment.node_key and
    deployment.start_supernode start more of them."""
    os.makedirs(folder, exist_ok=True)
    home = os.path.join(folder, "flwr_home")
    os.makedirs(home, exist_ok=True)
    link, *nodes = free_ports(1 + len(node_configs))
    tls = certificates(folder) if secure else {}
    # an explicit connection to our own SuperLink (the default 'local' one starts a detached SuperLink)
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write(f'[superlink]\ndefault = "here"\n\n[superlink.here]\naddress = "127.0.0.1:{link}"\n' +
                (f'root-certificates = "{tls["ca"]}"\n' if secure else "insecure = true\n"))
    env, procs, logs = flower_env(home), [], []

    def start(name, cmd):
        logs.append(open(os.path.join(folder, f"{name}.log"), "w"))
        procs.append(subprocess.Popen(cmd, env=env, cwd=folder, stdout=logs[-1], stderr=subprocess.STDOUT,
                                      start_new_session=True))
        return procs[-1]

    def start_supernode(name, config, port, key=None):
        """A SuperNode (and its worker); secure: it authenticates with the private key `key`."""
        supernode = [sys.executable, "-m", "fedsc_flower.supernode", "--isolation", "process"] if worker else ["flower-supernode"]
        security = ["--root-certificates", tls["ca"], "--auth-supernode-private-key", key] if secure else ["--insecure"]
        proc = start(name, supernode + security + ["--superlink", f"127.0.0.1:{link}", "--max-retries", "0",
                                                   "--host", "127.0.0.1", "--port", str(port), "--node-config", config])
        if worker:
            start(name.replace("supernode", "worker"), [sys.executable, "-m", "fedsc_flower.worker", "--insecure",
                                                         "--runtime-api-address", f"127.0.0.1:{port}"])
        return proc

    try:
        security = ["--ssl-ca-certfile", tls["ca"], "--ssl-certfile", tls["cert"], "--ssl-keyfile", tls["key"],
                    "--enable-supernode-auth"] if secure else ["--insecure"]
        start("superlink", ["flower-superlink", *security, "--host", "127.0.0.1", "--port", str(link),
                            "--disable-runtime-dependency-installation"])
        wait_for_port(link, procs[0])  # SuperNodes with --max-retries 0 need it up
        d = Deployment(folder, procs, env, "here")
        d.start_supernode, d.node_key = start_supernode, lambda name: node_key(folder, name)
        for k, (config, port) in enumerate(zip(node_configs, nodes)):
            key = None
            if secure:
                key, public = d.node_key(f"supernode{k}_key")
                if not d.flwr("supernode", "register", public, d.connection).get("success"):
                    raise RuntimeError(f"flwr supernode register {public} failed")
            start_supernode(f"supernode{k}", config, port, key)
        yield d
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
