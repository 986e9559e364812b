"""Tests of the optional Flower app (flower/): in Flower's simulation engine it gives the in-process
loop's global weights, bit for bit, and its preprocessing and federated metrics; a real deployment
(one SuperLink, two SuperNodes, `flwr run`) trains on two site files and each site writes back
only its own cells. Skipped when flwr is not installed (pip install -r requirements-flower.txt).
Run: python -m pytest -q tests/test_flower.py"""
import importlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

import common
import federated
import data as D
from helpers import ROOT, parse, rows, site_files, write_h5

APP = os.path.join(ROOT, "flower")
sys.path.insert(0, APP)
import localhost  # noqa: E402  (the app's folder is on the path above)
from fedsc_flower import records  # noqa: E402

TINY = "--local-epochs 1 --batch-size 64 --n-genes 100"


SIMULATE = """
import json, sys
import numpy as np
from flwr.simulation import run_simulation
from fedsc_flower import client_app, records, server_app
seen, ask = [], server_app.Sites.ask
def spied(self, action, **payload):  # every value that reaches the server, and its shape
    replies = ask(self, action, **payload)
    seen.extend([action, key, list(np.shape(v))] for r in replies for key, v in r.items())
    return replies
server_app.Sites.ask = spied
for name, method, extra in [("fedsc", "fedsc", ""), ("fedmoco", "fedmoco", " --version 2"), ("fedbyol", "fedbyol", ""),
                            ("fedsimclr", "fedsimclr", ""), ("fedsimsiam", "fedsimsiam", ""),
                            ("fedsc_bn", "fedsc", " --bn-stats recompute"), ("fedsc_eval", "fedsc", " --eval-every 1")]:
    run_simulation(server_app=server_app.make_app({"method": method, "rounds": 2, "data": sys.argv[1], "seed": 3,
                                                  "out-dir": sys.argv[2] + "/" + name, "args": sys.argv[3] + extra}),
                   client_app=client_app.app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
json.dump(seen, open(sys.argv[2] + "/seen.json", "w"))
"""


def run_folder(out):
    runs = os.listdir(os.path.join(out, "runs"))
    assert len(runs) == 1, runs
    return os.path.join(out, "runs", runs[0])


def test_defaults_are_the_pyprojects_run_config():
    import tomllib
    with open(os.path.join(APP, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["tool"]["flwr"]["app"]["config"] == records.DEFAULTS


def test_records_keep_every_bit_and_shape():
    model = importlib.import_module("fedsc").make_model(20, parse("fedsc"))
    state = {key: common.weights(m) for key, m in model.items()}
    back = records.unflat(records.plain(records.content(records.flat(state))))
    assert all(torch.equal(back[m][k], v) and back[m][k].dtype == v.dtype and back[m][k].shape == v.shape
               for m in state for k, v in state[m].items())
    assert records.unpack(records.pack({"x": np.float64(1.5)}))["x"].shape == ()  # 0-d stays 0-d


def test_waits_grow_by_first_up_to_the_cap_and_restart_after_work(monkeypatch):
    from fedsc_flower import waits
    slept = []
    monkeypatch.setattr(waits.time, "sleep", slept.append)
    b = waits.Backoff()
    for _ in range(14):
        b.wait()
    b.reset()
    b.wait()
    steps = [min(waits.FIRST * k, waits.POLL) for k in range(1, 15)] + [waits.FIRST]
    assert np.allclose(slept, steps) and max(slept) == waits.POLL
    slept.clear()
    server = waits.Backoff(cap=waits.SERVER_POLL)  # the ServerApp waiting for replies
    for _ in range(5):
        server.wait()
    assert np.allclose(slept, [min(waits.FIRST * k, waits.SERVER_POLL) for k in range(1, 6)])
    assert slept[-1] == waits.SERVER_POLL < waits.POLL


def test_a_message_is_few_objects_and_large_weights_go_in_chunks(monkeypatch):
    """Every object is a request at every hop: a site's reply is the message, its record dict and one
    record of values; weights above Flower's chunk size go as an Array (chunked), the same bits back."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    model = importlib.import_module("fedsc").make_model(20, parse("fedsc"))
    payload = {**records.flat({key: common.weights(m) for key, m in model.items()}), "lr": 0.1, "n": 3}
    for limit, n_objects in ((records.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, 2), (100, 5)):  # the message adds one
        monkeypatch.setattr(records, "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", limit)
        body = records.content(payload)
        assert len(get_all_nested_objects(body)) == n_objects
        back = records.plain(body)
        assert back.keys() == payload.keys() and back["lr"] == 0.1 and back["n"] == 3
        assert all(np.array_equal(back[k], payload[k].numpy()) for k in payload if k not in ("lr", "n"))


def test_simulation_refuses_a_file_under_a_benchmark_name_that_is_not_it():
    """As cli.resolve in process: the SuperNodes' file under a benchmark's name must be that benchmark."""
    from fedsc_flower import server_app
    hello = lambda order, sha: {"name": "", "order": order, "sha256": sha, "genes": None, "parts": 2}  # noqa: E731
    real = D.BENCHMARKS["10X_PBMC"]["sha256"]
    args = parse("fedsc", ["--data", "10X_PBMC"])
    with pytest.raises(D.DataError, match="--data 10X_PBMC: the SuperNodes' file is not the benchmark's file"):
        server_app.match_sites(None, args, [hello(0, "0" * 64), hello(1, "0" * 64)])
    with pytest.raises(records.SiteError, match="read different files"):
        server_app.match_sites(None, args, [hello(0, real), hello(1, "0" * 64)])
    server_app.match_sites(None, args, [hello(0, real), hello(1, real)])
    assert args.n_genes == D.BENCHMARKS["10X_PBMC"]["n_genes"] and args.data_sha256 == real[:16]


def test_unknown_method_and_missing_repository_say_so(monkeypatch):
    with pytest.raises(records.SiteError, match="error: unknown method 'fedx'; use one of fedsimclr"):
        records.method_module("fedx")
    monkeypatch.setattr(records, "APP_PARENT", "/nowhere")
    monkeypatch.delenv("FEDSC_REPO", raising=False)
    with pytest.raises(records.SiteError, match="repo-path"):
        records.repo({"repo-path": "/also/nowhere"})


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """2 rounds of each method on two SuperNodes of Flower's simulation engine (Ray), partition-id
    over one file, as the in-process loop partitions it."""
    tmp = tmp_path_factory.mktemp("sim")
    X, y = D.synthetic_counts(n_cells=300, n_genes=200, n_types=4, seed=0)
    path = write_h5(tmp / "synth.h5", X, y + 1)
    p = subprocess.run([sys.executable, "-c", SIMULATE, path, str(tmp), TINY], cwd=ROOT, capture_output=True, text=True,
                       env=localhost.flower_env(tmp / "home"), timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return path, tmp, p.stdout


@pytest.mark.parametrize("name,extra", [("fedsc", []), ("fedmoco", ["--version", "2"]), ("fedbyol", []), ("fedsimclr", []),
                                        ("fedsimsiam", []), ("fedsc_bn", ["--bn-stats", "recompute"])])
def test_simulation_gives_the_in_process_weights_bit_for_bit(name, extra, simulated, tmp_path):
    """The same seed, data and partition through common.federate (--preprocess federated --evaluate
    federated) and through Flower: the same global weights (torch.equal on every tensor), the same
    preprocessed cells on every site, the same federated metrics (fedsc_bn: with the BatchNorm
    statistics recomputed from the sites, by messages in Flower)."""
    path, tmp, log = simulated
    script = name.split("_")[0]  # fedsc_bn: fedsc.py with --bn-stats recompute
    mod = importlib.import_module(script)
    args = parse(script, ["--data", path, "--clients", "2", "--rounds", "2", "--seed", "3", "--preprocess", "federated",
                        "--evaluate", "federated", "--out", str(tmp_path / "r.csv")] + TINY.split() + extra)
    data = common.setup(args)
    model = mod.make_model(data.X.shape[1], args)
    initial = {key: common.weights(model[key]) for key in mod.UPLOAD}
    common.federate(args, data, model, mod.download, mod.local_update, mod.upload, mod.aggregate)
    folder = run_folder(os.path.join(tmp, name))
    flower = torch.load(os.path.join(folder, "global.pt"))
    assert set(flower) == set(mod.UPLOAD)
    for key in mod.UPLOAD:
        for k, v in model[key].state_dict().items():
            assert torch.equal(flower[key][k], v), f"{key}.{k} differs"
    assert any(not torch.equal(initial[key][k], v) for key in mod.UPLOAD for k, v in model[key].state_dict().items())
    # every site kept its own cells, preprocessed from the sites' statistics as in process
    import anndata
    for k, idx in enumerate(data.parts):
        ad = anndata.read_h5ad(os.path.join(folder, f"site{k}_synth_part{k}.h5ad"))
        assert np.array_equal(ad.X, data.X[idx])
        assert list(ad.obs_names) == [str(c) for c in data.cells[idx]]
    # the federated KMeans and metrics from messages equal federated.federated_metrics on the same encoder
    expected, _ = federated.federated_metrics(common.embed(args, model, data.X, [data.X[idx] for idx in data.parts]),
                                           data, args.seed)
    if name == "fedsc_bn":  # and the recomputed statistics change the result
        plain, _ = federated.federated_metrics(common.embed(parse(script, ["--out", "unused.csv"]), model, data.X),
                                            data, args.seed)
        assert plain["erank"] != pytest.approx(expected["erank"], rel=1e-6)
    got = json.load(open(os.path.join(folder, "result.json")))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    assert got["method"] == args.method and got["clients"] == 2 and got["status"] == "ok"


def test_the_server_receives_no_array_with_a_row_per_cell(simulated):
    """Every array of every site's reply in the simulated runs (preprocessing statistics, uploads,
    KMeans sums, contingency tables...): none has a dimension of a site's cell count."""
    path, tmp, log = simulated
    data = common.setup(parse("fedsc", ["--data", path, "--clients", "2", "--seed", "3", "--preprocess", "federated",
                                        "--out", os.path.join(tmp, "r.csv")] + TINY.split()))
    per_cell = {len(p) for p in data.parts} | {len(data.X)}
    seen = json.load(open(os.path.join(tmp, "seen.json")))
    actions = {a for a, _, _ in seen}
    assert {"totals", "hvg_moments", "log_moments", "train", "bn_moments", "embed", "lloyd", "finish"} <= actions
    assert not [s for s in seen if per_cell & set(s[2])], "an array with a row per cell reached the server"
    assert per_cell & {146, 154}  # the sites' sizes, which no gene, layer or cluster count equals


def test_a_site_error_stops_the_run_with_one_line_naming_the_site(tmp_path):
    p = subprocess.run([sys.executable, "-c", SIMULATE.split("for name, method")[0] + """
run_simulation(server_app=server_app.make_app({"rounds": 1, "data": sys.argv[1], "out-dir": sys.argv[2]}),
               client_app=client_app.app, num_supernodes=2,
               backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}, "init_args": {"num_cpus": 2}})
""", str(tmp_path / "nowhere.h5"), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       env=localhost.flower_env(tmp_path / "home"), timeout=600)
    assert p.returncode != 0
    assert re.search(r"^error: site \d \(partition \d\): data file '.*nowhere.h5' does not exist", p.stderr, re.M), p.stderr[-2000:]
    assert not os.path.exists(tmp_path / "results.csv")


# ---------------------------------------------------------------------------------------------
# A real deployment on this machine: separate processes talking over 127.0.0.1
# ---------------------------------------------------------------------------------------------
def test_deployment_one_superlink_two_supernodes_each_site_gets_its_own_cells(tmp_path):
    """flower/localhost.py: a SuperLink and two SuperNodes, each with its long-lived worker (worker.py), as
    separate processes, `flwr run`, polled to finished:completed, every process stopped by its PID; the
    global weights are the in-process --sites run's, bit for bit; each site wrote its own cells only."""
    a, b, X, y = site_files(tmp_path)
    nodes = [f'data-path="{path}" out-dir="{tmp_path / name}"' for name, path in (("site_a", a), ("site_b", b))]
    with localhost.deployment(tmp_path / "flower", nodes) as flower:
        status = flower.run(f'rounds=2 min-sites=2 timeout=600 out-dir="{tmp_path / "server"}" args="{TINY}"')
        procs = flower.procs
    assert status == "finished:completed", (status, (tmp_path / "flower" / "superlink.log").read_text()[-3000:])
    assert len(procs) == 5 and all(p.poll() is not None for p in procs)  # SuperLink, 2 SuperNodes, 2 workers
    # the server's row, and each site's own cells, preprocessed as the in-process --sites run does
    row = rows(str(tmp_path / "server" / "results.csv")).iloc[0]
    assert row["status"] == "ok" and row["clients"] == 2 and json.loads(row["sites"].replace("'", '"')) == ["a.h5", "b.h5"]
    import anndata
    args = parse("fedsc", ["--sites", a, b, "--out", str(tmp_path / "r.csv"), "--rounds", "2", "--preprocess", "federated",
                           "--evaluate", "federated"] + TINY.split())
    fedsc = importlib.import_module("fedsc")
    data = common.setup(args)  # the in-process --sites run: seeds, loads the sites, then the model as the script builds it
    model = fedsc.make_model(data.X.shape[1], args)
    common.federate(args, data, model, fedsc.download, fedsc.local_update, fedsc.upload, fedsc.aggregate)
    flower = torch.load(os.path.join(run_folder(tmp_path / "server"), "global.pt"))
    assert all(torch.equal(flower[key][k], v) for key in flower for k, v in model[key].state_dict().items())
    for k, (name, n, prefix) in enumerate((("site_a", 70, "a"), ("site_b", 90, "b"))):
        folder = run_folder(tmp_path / name)
        assert os.listdir(folder) == [f"site{k}_{prefix}.h5ad"]  # this site's file only
        ad = anndata.read_h5ad(os.path.join(folder, f"site{k}_{prefix}.h5ad"))
        assert list(ad.obs_names) == [f"{prefix}{i}" for i in range(n)]  # its cells, no other site's
        assert np.array_equal(ad.X, data.X[data.parts[k]])
        assert ad.obsm["X_fedsc"].shape == (n, 60) and np.isfinite(ad.obsm["X_fedsc"]).all()
        assert list(ad.obs["cell_type"]) == list(np.array(["B", "NK", "T", "mono"])[y[:70] if k == 0 else y[70:]])
        assert set(ad.obs["fedsc_cluster"].astype(int)) <= set(range(4))


def test_a_deployment_with_tls_and_supernode_authentication(tmp_path):
    """Certificates and keys made in the test: the SuperLink serves TLS only (a connection without it is
    refused) and admits only registered SuperNodes (a SuperNode with an unregistered key exits with Flower's
    code 305 and is not listed); the run of the two registered sites completes."""
    a, b, X, y = site_files(tmp_path)
    nodes = [f'data-path="{path}" out-dir="{tmp_path / name}"' for name, path in (("site_a", a), ("site_b", b))]
    with localhost.deployment(tmp_path / "flower", nodes, secure=True) as flower:
        status = flower.run(f'rounds=1 min-sites=2 timeout=600 evaluate=false out-dir="{tmp_path / "server"}" args="{TINY}"')
        key, _ = flower.node_key("unregistered")
        intruder = flower.start_supernode("supernode_unregistered", f'data-path="{a}"', localhost.free_ports(1)[0], key)
        assert intruder.wait(timeout=120) != 0
        listed = flower.flwr("supernode", "ls", flower.connection)
        config = tmp_path / "flower" / "flwr_home" / "config.toml"
        address = re.search(r'address = "([^"]+)"', config.read_text()).group(1)
        with open(config, "a") as f:
            f.write(f'\n[superlink.plain]\naddress = "{address}"\ninsecure = true\n')
        plain = flower.flwr("ls", "plain")
    assert status == "finished:completed", (tmp_path / "flower" / "superlink.log").read_text()[-3000:]
    assert "Exit Code: 305" in (tmp_path / "flower" / "supernode_unregistered.log").read_text()
    assert listed["success"] and len(listed["nodes"]) == 2, listed
    assert not plain.get("success") and "unavailable" in plain.get("error-message", ""), plain
    assert rows(str(tmp_path / "server" / "results.csv")).iloc[0]["status"] == "ok"


def test_flower_refuses_what_it_does_not_offer(tmp_path):
    """--anchor runs in process only: the Flower server says so before any site is asked."""
    from fedsc_flower import server_app
    config = {"method": "fedsc", "data": "10X_PBMC", "rounds": 2, "seed": 0, "lr-schedule": "cosine",
              "out-dir": str(tmp_path)}
    assert server_app.make_args(dict(config, args=""), 2)[1].anchor == 0
    with pytest.raises(server_app.SiteError, match="--anchor"):
        server_app.make_args(dict(config, args="--anchor 1"), 2)


def test_eval_every_on_flower_scores_during_training_and_changes_nothing(simulated):
    """--eval-every 1 over 2 rounds: round 1's line has the federated ARI; the trained weights are
    the bits of the same run without it."""
    path, tmp, log = simulated
    assert re.search(r"^round 1/2 .* ari \d+\.\d\d", log, re.M), log[-3000:]
    plain = torch.load(os.path.join(run_folder(os.path.join(tmp, "fedsc")), "global.pt"))
    scored = torch.load(os.path.join(run_folder(os.path.join(tmp, "fedsc_eval")), "global.pt"))
    assert all(torch.equal(plain[key][k], v) for key in plain for k, v in scored[key].items())


def test_a_diverged_flower_run_writes_its_row(tmp_path):
    X, y = D.synthetic_counts(n_cells=200, n_genes=150, n_types=4, seed=0)
    path = write_h5(tmp_path / "synth.h5", X, y + 1)
    p = subprocess.run([sys.executable, "-c", SIMULATE.split("for name, method")[0] + """
run_simulation(server_app=server_app.make_app({"method": "fedsimclr", "rounds": 1, "data": sys.argv[1],
                                               "out-dir": sys.argv[2], "args": "--lr 1e30 " + sys.argv[3]}),
               client_app=client_app.app, num_supernodes=2,
               backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}, "init_args": {"num_cpus": 2}})
""", path, str(tmp_path), TINY], cwd=ROOT, capture_output=True, text=True, env=localhost.flower_env(tmp_path / "home"),
                       timeout=600)
    assert re.search(r"^diverged: ", p.stderr, re.M), p.stdout[-2000:] + p.stderr[-2000:]
    r = rows(str(tmp_path / "results.csv"))
    assert r["status"].tolist() == ["diverged"] and r["runtime"].tolist() == ["flower"]
    assert os.path.exists(os.path.join(run_folder(str(tmp_path)), "rounds.csv"))
