"""Tests: every script end to end as a subprocess with tiny settings; in-process checks of the input
errors; reference checks of the pieces that decide the results (FedAvg, FedSC's mu and merge, the
losses against naive loops, stop-gradients, schedules, partition, HVGs, masking); a learning test
per method; what crosses from clients to the server; the benchmark's cache and tables.
Run: python -m pytest -q test_smoke.py   (real-data tests read $FEDSC_DATA_DIR, default ./data)"""
import copy
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

import cli
import common
import federated
import runs
import data as D

torch.set_num_threads(1)  # as every script does: this small MLP is slower on two threads
ROOT = os.path.dirname(os.path.abspath(__file__))
REAL = os.environ.get("FEDSC_DATA_DIR", os.path.join(ROOT, "data"))
BLADDER = os.path.join(REAL, "mouse_bladder_cell_top2000.h5")
TINY = ["--rounds", "2", "--local-epochs", "1", "--batch-size", "64", "--n-genes", "100"]
SCRIPTS = [("fedsc.py", []), ("fedbyol.py", []), ("fedsimclr.py", []), ("fedmoco.py", ["--version", "1"]),
           ("fedmoco.py", ["--version", "2"]), ("fedsimsiam.py", [])]
METHODS = [("fedsimclr", []), ("fedmoco", []), ("fedmoco", ["--version", "2"]), ("fedsimsiam", []),
           ("fedbyol", []), ("fedsc", [])]


def run(args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, env=e, timeout=600)


def write_h5(path, X, y=None, **extra):
    with h5py.File(path, "w") as f:
        f["X"] = X
        if y is not None:
            f["Y"] = y
        for k, v in extra.items():
            f[k] = v
    return str(path)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    X, y = D.synthetic_counts(n_cells=300, n_genes=200, n_types=4, seed=0)
    return write_h5(tmp_path_factory.mktemp("data") / "synth.h5", X, y + 1)


def rows(csv):
    return pd.read_csv(csv, float_precision="round_trip") if os.path.exists(csv) else pd.DataFrame()


def parse(name, argv=()):
    return common.parse_args(importlib.import_module(name).Args, list(argv))


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,extra", SCRIPTS, ids=[s + "".join(e) for s, e in SCRIPTS])
def test_script_end_to_end_synthetic(script, extra, synth, tmp_path):
    out = str(tmp_path / "r.csv")
    p = run([script, "--data", synth, "--clients", "2", "--out", out] + TINY + extra)
    assert p.returncode == 0, p.stderr
    assert "round 2/2" in p.stdout and "final" in p.stdout
    r = rows(out)
    assert len(r) == 1 and r["rounds"][0] == 2 and r["status"][0] == "ok"
    assert r["method"][0] == {"fedsc.py": "FedSC", "fedbyol.py": "FedBYOL", "fedsimclr.py": "FedSimCLR",
                              "fedsimsiam.py": "FedSimSiam"}.get(script, f"FedMoCoV{extra[-1] if extra else 1}")
    run_dir = os.path.join(tmp_path, "runs", r["run"][0])
    assert " " not in r["run"][0]
    assert np.load(os.path.join(run_dir, "embedding.npy")).shape == (300, common.EMBED_DIM)
    cl = pd.read_csv(os.path.join(run_dir, "clusters.csv"))
    assert len(cl) == 300 and list(cl["cell"]) == list(range(300))
    # the row's ARI is the one of the clusters it saved, against the input's labels
    assert r["ari"][0] == pytest.approx(100 * adjusted_rand_score(cl["label"], cl["cluster"]))
    assert sorted(set(cl["label_name"].astype(str))) == ["1", "2", "3", "4"]
    log = pd.read_csv(os.path.join(run_dir, "rounds.csv"))
    assert len(log) == 2 * 2 and set(log["client"]) == {0, 1} and np.isfinite(log["loss"]).all()
    assert r["code"][0] == runs.code_hash(os.path.join(ROOT, script))


@pytest.mark.skipif(not os.path.exists(BLADDER), reason="real bladder file not available")
def test_fedsc_on_real_bladder(tmp_path):
    out = str(tmp_path / "r.csv")
    p = run(["fedsc.py", "--data", "mouse_bladder", "--rounds", "2", "--local-epochs", "1", "--out", out],
            env={"FEDSC_DATA_DIR": REAL})
    assert p.returncode == 0, p.stderr
    assert "2746 cells x 1500 genes, 16 types" in p.stdout
    r = rows(out)
    assert r["ari"][0] > 1 and r["types_per_client"][0] == 4 and r["n_genes"][0] == 1500
    assert "mu 0.700/0.700/0.700/0.700" in p.stdout  # round 2 is every client's first EMA: mu = alpha


@pytest.mark.skipif(not os.path.exists(BLADDER), reason="real bladder file not available")
def test_benchmark_file_by_path_gets_the_benchmarks_defaults(tmp_path):
    args = parse("fedsc", ["--data", BLADDER, "--out", str(tmp_path / "r.csv")])
    cli.resolve(args, os.path.join(ROOT, "fedsc.py"))
    assert args.n_genes == 1500 and args.types_per_client == 4


@pytest.mark.parametrize("baseline,dim", [("pca", 50), ("pca_raw", 2), ("csc", common.EMBED_DIM)])
def test_centralized_baselines(baseline, dim, synth, tmp_path):
    from sklearn.decomposition import PCA
    out = str(tmp_path / "r.csv")
    p = run(["centralized.py", "--data", synth, "--baseline", baseline, "--epochs", "2", "--n-genes", "100",
             "--out", out])
    assert p.returncode == 0, p.stderr
    r = rows(out)
    assert r["method"][0] == {"pca": "PCA", "pca_raw": "PCA-raw (paper)", "csc": "contrastive-sc"}[baseline]
    h = np.load(os.path.join(tmp_path, "runs", r["run"][0], "embedding.npy"))
    assert h.shape == (300, dim) and "rounds" not in r and "clients" not in r
    if baseline != "csc":  # the same embedding computed here, from the baseline's definition
        X, y, _, _ = D.read_counts(synth)
        Xin = D.preprocess(X, 100)[0] if baseline == "pca" else np.ceil(X.astype(np.float64))
        ref = PCA(dim, random_state=0).fit_transform(Xin)
        assert np.allclose(np.abs(h), np.abs(ref), atol=1e-4)


def test_same_seed_same_metrics_other_seed_differs(synth, tmp_path):
    out = str(tmp_path / "r.csv")
    for seed in ("3", "3", "4"):
        assert run(["fedsc.py", "--data", synth, "--clients", "2", "--seed", seed, "--out", out] + TINY).returncode == 0
    r = rows(out)
    assert r.loc[0, ["ari", "nmi", "sil", "ch"]].tolist() == r.loc[1, ["ari", "nmi", "sil", "ch"]].tolist()
    assert r.loc[0, "ch"] != r.loc[2, "ch"]
    assert r.loc[0, "config_id"] == r.loc[1, "config_id"] != r.loc[2, "config_id"]
    assert r.loc[0, "run"] != r.loc[1, "run"]  # two runs never share a folder


def test_fedsc_with_one_client_is_fedbyol_and_with_two_is_not(synth, tmp_path):
    """With one client the global model is that client's model, so FedSC's merge must return it
    unchanged (the split table's one-client FedSC and FedBYOL rows are the same run); with two
    clients the merge keeps part of the local model, so the runs differ."""
    emb = {}
    for clients in ("1", "2"):
        out = str(tmp_path / f"c{clients}.csv")
        for script in ("fedsc.py", "fedbyol.py"):
            p = run([script, "--data", synth, "--clients", clients, "--partition", "iid", "--out", out] + TINY
                    + ["--rounds", "3"])
            assert p.returncode == 0, p.stderr
        r = rows(out)
        emb[clients] = [np.load(os.path.join(tmp_path, "runs", name, "embedding.npy")) for name in r["run"]]
    assert np.array_equal(*emb["1"])
    assert not np.allclose(*emb["2"])


def test_eval_every_does_not_change_the_run(synth, tmp_path):
    """Evaluating the global model during training must not touch the clients or their RNGs."""
    out = str(tmp_path / "r.csv")
    for extra in ([], ["--eval-every", "1"]):
        p = run(["fedsc.py", "--data", synth, "--clients", "2", "--rounds", "3", "--out", out] + TINY[2:] + extra)
        assert p.returncode == 0, p.stderr
    first = p.stdout.split("round 1/3")[1].splitlines()[0]
    assert "ari" in first and "erank" in first
    r = rows(out)
    assert r.loc[0, ["ari", "nmi", "sil", "ch"]].tolist() == r.loc[1, ["ari", "nmi", "sil", "ch"]].tolist()


def test_unlabelled_genes_by_cells_csv(tmp_path):
    X, _ = D.synthetic_counts(n_cells=200, n_genes=150, seed=1)
    path = tmp_path / "counts.csv"
    pd.DataFrame(X.T, index=[f"g{i}" for i in range(150)],
                 columns=[f"cell{i}" for i in range(200)]).to_csv(path)  # genes x cells, as R writes
    out = str(tmp_path / "r.csv")
    p = run(["fedsc.py", "--data", str(path), "--transpose", "--partition", "iid", "--n-clusters", "3",
             "--clients", "2", "--out", out] + TINY)
    assert p.returncode == 0, p.stderr
    r = rows(out)
    assert "ari" not in r.columns and np.isfinite(r["sil"][0]) and len(pd.read_csv(
        os.path.join(tmp_path, "runs", r["run"][0], "clusters.csv"))) == 200


def test_federated_preprocessing_and_evaluation_end_to_end(synth, tmp_path):
    """--preprocess federated trains the same encoder as pooled preprocessing (every cell is on a
    client here); --evaluate federated reports ARI/NMI from the summed contingency table, which
    equals the ARI of the clusters it saved."""
    out = str(tmp_path / "r.csv")
    runs = {}
    for extra in ([], ["--preprocess", "federated", "--evaluate", "federated"]):
        p = run(["fedsc.py", "--data", synth, "--clients", "2", "--partition", "iid", "--out", out] + TINY + extra)
        assert p.returncode == 0, p.stderr
        r = rows(out).iloc[-1]
        folder = os.path.join(tmp_path, "runs", r["run"])
        cl = pd.read_csv(os.path.join(folder, "clusters.csv"))
        runs[bool(extra)] = (r, cl, np.load(os.path.join(folder, "embedding.npy")))
    (r0, cl0, h0), (r1, cl1, h1) = runs[False], runs[True]
    assert sorted(cl1["cell"]) == list(cl0["cell"])
    assert np.allclose(h1[np.argsort(cl1["cell"].to_numpy())], h0, atol=1e-5)  # the same encoder
    assert r1["ari"] == pytest.approx(100 * adjusted_rand_score(cl1["label"], cl1["cluster"]))
    assert np.isfinite(r1["sil_simplified"]) and np.isfinite(r1["ch"])


def _site_files(tmp):
    """Two sites of one synthetic dataset, as two labs would have them: gene names in another order
    and one gene only the second site measured; labels and barcodes."""
    X, y = D.synthetic_counts(n_cells=160, n_genes=60, n_types=4, seed=11)
    genes = np.array([f"Gene{i}" for i in range(60)])
    names = np.array(["B", "NK", "T", "mono"])
    a = write_h5(tmp / "a.h5", X[:70], names[y[:70]].astype("S"), gene_names=genes.astype("S"),
                 cell_names=np.array([f"a{i}" for i in range(70)]).astype("S"))
    order = np.random.default_rng(0).permutation(60)
    Xb = np.hstack([X[70:, order], np.ones((90, 1))])
    b = write_h5(tmp / "b.h5", Xb, names[y[70:]].astype("S"), gene_names=np.append(genes[order], "Extra1").astype("S"),
                 cell_names=np.array([f"b{i}" for i in range(90)]).astype("S"))
    return a, b, X, y


def test_one_file_per_site(tmp_path):
    a, b, X, y = _site_files(tmp_path)
    out = str(tmp_path / "r.csv")
    p = run(["fedsc.py", "--sites", a, b, "--out", out] + TINY)
    assert p.returncode == 0, p.stderr
    assert "genes: 60 shared by all sites; dropped per site: [0, 1]" in p.stdout
    r = rows(out)
    assert r["clients"][0] == 2 and r["run"][0].startswith("sites__")
    cl = pd.read_csv(os.path.join(tmp_path, "runs", r["run"][0], "clusters.csv"))
    assert list(cl["client"]) == [0] * 70 + [1] * 90 and list(cl["barcode"][:2]) == ["a0", "a1"]
    assert list(cl["label_name"]) == list(np.array(["B", "NK", "T", "mono"])[y])
    # each site's own cells come back as an .h5ad that anndata and plain h5py both read
    import anndata
    folder = os.path.join(tmp_path, "runs", r["run"][0])
    emb = np.load(os.path.join(folder, "embedding.npy"))
    for k, (n, first) in enumerate([(70, 0), (90, 70)]):
        ad = anndata.read_h5ad(os.path.join(folder, f"site{k}_{'ab'[k]}.h5ad"))
        assert ad.shape == (n, 60) and list(ad.obs_names[:1]) == [f"{'ab'[k]}0"] and ad.var_names[0].startswith("Gene")
        assert np.allclose(ad.obsm["X_fedsc"], emb[first:first + n]) and str(ad.obs["fedsc_cluster"].dtype) == "category"
        assert list(ad.obs["fedsc_cluster"].astype(int)) == list(cl["cluster"][first:first + n])
        assert json.loads(ad.uns["fedsc_config"])["sites"] == [a, b]
        with h5py.File(os.path.join(folder, f"site{k}_{'ab'[k]}.h5ad")) as f:
            assert f["obsm"]["X_fedsc"].shape == (n, 60) and f.attrs["encoding-type"] == "anndata"
    # the same cells in one file give the same preprocessed matrix: sites are matched by gene name
    args = parse("fedsc", ["--sites", a, b, "--n-genes", "100", "--out", out])
    cli.check_args(args)
    cli.resolve(args, os.path.join(ROOT, "fedsc.py"))
    assert np.allclose(federated.load_sites(args).X, D.preprocess(X, 100)[0], atol=1e-5)


def test_server_receives_no_array_with_a_row_per_cell(tmp_path, monkeypatch):
    """A whole federated run (--sites: per-site preprocessing, training, federated evaluation) with
    every SITE -> SERVER crossing spied on: what the site functions return to the server (gene
    moments, counts below a threshold, uploads, per-cluster sums, contingency and scatter tables)
    and what the server functions receive. None of it may have a dimension of a site's cell count
    (70 and 90 here, which no gene, cluster or layer count equals)."""
    fedsc = importlib.import_module("fedsc")
    a, b, _, _ = _site_files(tmp_path)
    per_cell, seen = {70, 90, 160}, []

    def arrays(obj):
        if isinstance(obj, (np.ndarray, torch.Tensor)):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from arrays(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from arrays(v)

    def check(where, obj):
        for x in arrays(obj):
            seen.append(where)
            assert not per_cell & set(x.shape), f"{where} carries an array of shape {tuple(x.shape)}"

    def spy(mod, name, send=lambda out: out):  # check what a SITE function sends / a SERVER one gets
        f = getattr(mod, name)
        def wrapped(*a, **k):
            check(f"{name} args", (a, k)) if name in SERVER else None
            out = f(*a, **k)
            check(f"{name} output", send(out)) if name in SITE else None
            return out
        monkeypatch.setattr(mod, name, wrapped)

    SITE = {"site_moments", "site_count", "site_contingency", "site_scatter", "site_assign", "site_bn_moments"}
    SERVER = {"merge_moments", "hvg_from_moments", "merge_scatter", "scores_from_contingency", "rank_from_scatter",
              "merge_bn_moments"}
    for name in ("site_moments", "merge_moments", "site_count"):
        spy(federated, name)
    spy(D, "hvg_from_moments")
    for name in ("site_contingency", "site_scatter", "merge_scatter", "scores_from_contingency", "rank_from_scatter",
                 "site_bn_moments", "merge_bn_moments"):
        spy(federated, name)
    spy(federated, "site_assign", send=lambda out: out[1])  # the labels stay on the site
    ask = federated.LocalSites.ask
    def spied_ask(self, action, **payload):  # and every reply of every site to every question of the server
        replies = ask(self, action, **payload)
        check("replies", replies)
        return replies
    monkeypatch.setattr(federated.LocalSites, "ask", spied_ask)
    upload = lambda client: (lambda out: (check("upload", out), out)[1])(fedsc.upload(client))
    aggregate = lambda uploads: (check("aggregate args", uploads), fedsc.aggregate(uploads))[1]

    args = parse("fedsc", ["--sites", a, b, "--evaluate", "federated", "--bn-stats", "recompute",
                           "--out", str(tmp_path / "r.csv")] + TINY)
    data = common.setup(args)
    model = fedsc.make_model(data.X.shape[1], args)
    log = common.federate(args, data, model, fedsc.download, fedsc.local_update, upload, aggregate)
    metrics = common.finish(args, data, model, log)
    assert np.isfinite(metrics["ari"]) and np.isfinite(metrics["sil_simplified"])
    for where in ("replies", "site_moments output", "merge_moments args", "site_count output", "upload", "aggregate args",
                  "site_assign output", "site_contingency output", "scores_from_contingency args",
                  "site_scatter output", "merge_scatter args", "site_bn_moments output", "merge_bn_moments args"):
        assert where in seen, f"the spy on {where} saw nothing"
    # and the check bites: a site's labels (one per cell) would be caught
    h = np.random.default_rng(0).normal(size=(70, 5))
    with pytest.raises(AssertionError, match="shape"):
        check("labels", federated.site_assign(h, h[:4])[0])
    monkeypatch.setattr(federated, "site_clusters", lambda state, **payload: {"labels": state["h"][:, 0]})
    with pytest.raises(AssertionError, match="shape"):  # a site step that sends its cells' labels is caught
        federated.LocalSites([{"h": h}]).ask("clusters")


def test_bn_recompute_from_sites_equals_pooled_training_mode():
    """--bn-stats recompute: BatchNorm statistics merged from per-site sums give, in eval mode, the
    embedding of a training-mode pass over all the sites' cells as one batch (the pooled
    computation), and differ from FedAvg's averaged running statistics on non-IID sites."""
    torch.manual_seed(0)
    fedsc = importlib.import_module("fedsc")
    model = fedsc.make_model(30, parse("fedsc", ["--out", "unused.csv"]))
    enc = model["online"]
    for bn in (m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm1d)):  # some running stats
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    sites = [np.random.default_rng(k).normal(loc=3 * k, size=(40 + 25 * k, 30)).astype(np.float32) for k in range(3)]
    X = np.concatenate(sites)
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(copy.deepcopy(enc).train().f(torch.from_numpy(X)), dim=1)
    args = parse("fedsc", ["--bn-stats", "recompute", "--out", "unused.csv"])
    before = copy.deepcopy(enc.state_dict())
    h = common.embed(args, model, X, sites)
    assert np.allclose(h, pooled.double().numpy(), atol=1e-4)
    assert not np.allclose(common.embed(parse("fedsc", ["--out", "unused.csv"]), model, X), h, atol=1e-2)
    assert all(torch.equal(v, before[k]) for k, v in enc.state_dict().items())  # a copy was recalibrated
    # pooled evaluation (sites=None) treats every cell as one site: the same statistics
    assert np.allclose(common.embed(args, model, X), h, atol=1e-5)


def test_bn_recompute_row_also_scores_the_running_statistics(synth, tmp_path):
    """A --bn-stats recompute run's row holds its scores and, as bn_running_*, those of the same
    encoder with FedAvg's running statistics (what the tuning grid's BatchNorm axis compares);
    benchmark.tune_score reads the one asked for."""
    import benchmark
    fedsc = importlib.import_module("fedsc")
    out = str(tmp_path / "r.csv")
    args = parse("fedsc", ["--data", synth, "--clients", "2", "--bn-stats", "recompute", "--out", out] + TINY)
    data = common.setup(args)
    model = fedsc.make_model(data.X.shape[1], args)
    log = common.federate(args, data, model, fedsc.download, fedsc.local_update, fedsc.upload, fedsc.aggregate)
    common.finish(args, data, model, log)
    r = rows(out).iloc[0]
    plain = parse("fedsc", ["--data", synth, "--out", out])
    running, _ = common.cluster_metrics(common.embed(plain, model, data.X), data.y, data.n_clusters, args.seed)
    recomputed, _ = common.cluster_metrics(common.embed(args, model, data.X), data.y, data.n_clusters, args.seed)
    assert r["bn_running_ari"] == pytest.approx(running["ari"]) and r["bn_running_sil"] == pytest.approx(running["sil"])
    assert r["ari"] == pytest.approx(recomputed["ari"]) and r["sil"] == pytest.approx(recomputed["sil"])
    assert r["sil"] != pytest.approx(r["bn_running_sil"])
    frame = pd.DataFrame({"ari": [40.0, 50.0], "bn_running_ari": [60.0, 30.0]})
    assert benchmark.tune_score(frame, "recompute") == 45.0 and benchmark.tune_score(frame, "running") == 45.0
    assert benchmark.tune_score(frame.iloc[:0], "running") == -np.inf
    frame["status"] = ["ok", "diverged"]  # a grid point with a diverged seed is not chosen
    frame.loc[1, ["ari", "bn_running_ari"]] = np.nan
    assert benchmark.tune_score(frame, "recompute") == -np.inf and benchmark.tune_score(frame, "running") == -np.inf


def test_tune_grid_axis_flags_and_choice(monkeypatch, tmp_path):
    """The tuning grid's per-method axis (predictor or temperature): its first value is the paper's
    (no flag, so those runs are the two-axis grid's), its second changes exactly that option; every
    method gets the same number of runs; recipes.json takes the best mean ARI over all four axes and
    agrees with the tuning table's choice."""
    import benchmark
    counts = {}
    for _, script, argv, _ in benchmark.plan("tune", [0]):
        counts[script] = counts.get(script, 0) + 1
    per_label = {label: (36 if script != "fedmoco.py" else 72) for label, script, _ in benchmark.FED}
    assert {s: n for s, n in counts.items()} == {script: per_label[label] for label, script, _ in benchmark.FED}
    for label, script, extra in benchmark.FED:
        name, (paper, other) = benchmark.TUNE_AXIS[label]
        base = benchmark.tune_argv(label, extra, 0.3, 50, 5)
        assert benchmark.tune_argv(label, extra, 0.3, 50, 5, paper) == base
        a, b = parse(script[:-3], base), parse(script[:-3], benchmark.tune_argv(label, extra, 0.3, 50, 5, other))
        assert getattr(a, name) == paper and getattr(b, name) == other
        assert {k for k in vars(a) if vars(a)[k] != vars(b)[k]} == {name}
    # a synthetic grid: one point (an axis value, lr 0.3, 25 x 5) is best with recomputed statistics
    target = {"FedSC": ["--predictor", "mlp", "--lr", "0.3", "--rounds", "25"],
              "FedSimCLR": ["--temperature", "0.5", "--lr", "0.3", "--rounds", "25"]}

    def fake_rows(df, script, argv, seeds, overrides, missing):
        label = next(l for l, s, e in benchmark.FED if s == script and all(x in argv for x in e))
        hit = label in target and all(" ".join(target[label][i:i + 2]) in " ".join(argv) for i in (0, 2, 4))
        return pd.DataFrame({"ari": [70.0 if hit else 40.0] * len(seeds), "bn_running_ari": [50.0] * len(seeds)})
    monkeypatch.setattr(benchmark, "rows_for", fake_rows)
    monkeypatch.setattr(cli, "RECIPES", str(tmp_path / "recipes.json"))
    benchmark.write_recipes(pd.DataFrame(), [0, 1, 2])
    chosen = json.load(open(tmp_path / "recipes.json"))["recipes"]
    assert chosen["FedSC"] == dict(lr=0.3, rounds=25, local_epochs=5, bn_stats="recompute", predictor="mlp",
                                   mu_rule="relative")
    assert chosen["FedSimCLR"] == dict(lr=0.3, rounds=25, local_epochs=5, bn_stats="recompute", temperature=0.5)
    assert chosen["FedBYOL"] == dict(lr=0.1, rounds=25, local_epochs=5, bn_stats="running", predictor="linear")
    table = benchmark.tune_table(pd.DataFrame(), [0, 1, 2], [], benchmark.Missing())
    assert "| lr 0.3, 25 x 5, predictor mlp, recompute |" in table
    assert "| lr 0.3, 25 x 5, temperature 0.5, recompute |" in table
    assert "| lr 0.1, 25 x 5, predictor linear, running |" in table
    fedsc_lines = [l for l in table.splitlines() if "predictor mlp | recompute" in l]
    assert "**70.00 ± 0.00**" in fedsc_lines[2]  # FedSimSiam, FedBYOL, then FedSC: its own best in bold


def test_split_by_batch_then_run_the_sites(tmp_path):
    X, y = D.synthetic_counts(n_cells=120, n_genes=50, n_types=3, seed=12)
    batch = np.where(np.arange(120) < 50, "mouse1", "mouse2")
    path = write_h5(tmp_path / "two.h5", X, y, batch=batch.astype("S"),
                    gene_names=np.array([f"G{i}" for i in range(50)]).astype("S"))
    p = run(["split.py", path, "--by", "batch", "--out", str(tmp_path / "sites")])
    assert p.returncode == 0, p.stderr
    files = sorted(os.listdir(tmp_path / "sites"))
    assert files == ["two_mouse1.h5", "two_mouse2.h5"]
    X1, y1, _, _ = D.read_counts(str(tmp_path / "sites" / files[0]))
    assert np.array_equal(X1, X[:50]) and np.array_equal(y1, y[:50])
    out = str(tmp_path / "r.csv")
    p = run(["fedsimclr.py", "--sites"] + [str(tmp_path / "sites" / f) for f in files] + ["--out", out] + TINY)
    assert p.returncode == 0, p.stderr
    assert "genes: 50 shared by all sites" in p.stdout
    p = run(["split.py", path, "--by", "donor"])
    assert p.returncode == 2 and "no dataset 'donor'" in p.stderr


@pytest.mark.parametrize("case,expect", [("missing", "site 1 ('"), ("no shared genes", "share no gene name"),
                                         ("duplicate barcodes", "duplicate cell barcodes"), ("no names", "no gene names")])
def test_bad_sites_are_refused_naming_the_site(case, expect, tmp_path):
    a, b, X, y = _site_files(tmp_path)
    if case == "missing":
        b = str(tmp_path / "nowhere.h5")
    elif case == "no shared genes":
        with h5py.File(b, "a") as f:
            del f["gene_names"]
            f["gene_names"] = np.array([f"Other{i}" for i in range(61)]).astype("S")
    elif case == "duplicate barcodes":
        with h5py.File(b, "a") as f:
            del f["cell_names"]
            f["cell_names"] = np.array(["b0"] * 90).astype("S")
    else:
        with h5py.File(b, "a") as f:
            del f["gene_names"]
    args = parse("fedsc", ["--sites", a, b, "--out", str(tmp_path / "r.csv")])
    with pytest.raises(D.DataError, match=re.escape(expect)):
        common.setup(args)


def test_diverged_run_says_so_and_records_it(synth, tmp_path):
    out = str(tmp_path / "r.csv")
    p = run(["fedsimclr.py", "--data", synth, "--clients", "2", "--out", out, "--lr", "1e30"] + TINY)
    assert p.returncode == 3 and p.stderr.startswith("diverged: ") and "Traceback" not in p.stderr
    r = rows(out)
    assert r["status"].tolist() == ["diverged"] and "ari" not in r


# ---------------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit 2, no traceback, no row, before any training
# ---------------------------------------------------------------------------------------------
def _bad_files(tmp):
    X, y = D.synthetic_counts(n_cells=50, n_genes=40, n_types=4, seed=0)
    f = {"neg": write_h5(tmp / "neg.h5", -X, y), "nan": write_h5(tmp / "nan.h5", np.where(X > 3, np.nan, X), y),
         "short": write_h5(tmp / "short.h5", X, y[:-5]), "ok": write_h5(tmp / "ok.h5", X, y),
         "tiny": write_h5(tmp / "tiny.h5", X[:3], y[:3]), "lognorm": write_h5(tmp / "lognorm.h5", np.log1p(X), y)}
    with h5py.File(tmp / "nocounts.h5", "w") as h:
        h["Y"] = y
    f["nocounts"] = str(tmp / "nocounts.h5")
    (tmp / "junk.h5").write_text("not hdf5")
    f["junk"] = str(tmp / "junk.h5")
    pd.DataFrame(X).to_csv(tmp / "noheader.csv", header=False, index=False)
    f["noheader"] = str(tmp / "noheader.csv")
    pd.DataFrame(X.T, index=[f"ENSG{i:011d}" for i in range(40)], columns=[f"c{i}" for i in range(50)]).to_csv(tmp / "gxc.csv")
    f["gxc"] = str(tmp / "gxc.csv")
    pd.DataFrame(X, index=[f"c{i}" for i in range(50)], columns=[f"g{i}" for i in range(40)]).to_csv(tmp / "cxg.csv")
    (tmp / "labels40.txt").write_text("\n".join("ab"[i % 2] for i in range(40)))
    f["cxg"], f["labels40"] = str(tmp / "cxg.csv"), str(tmp / "labels40.txt")
    (tmp / "notresults.csv").write_text("a,b\n1,2\n")
    pd.DataFrame(X[:, 1:], index=X[:, 0], columns=[f"g{i}" for i in range(39)]).to_csv(tmp / "nonames.csv")
    f["nonames"] = str(tmp / "nonames.csv")
    f["notresults"] = str(tmp / "notresults.csv")
    return f


BAD = [  # (case, script, arguments, part of the message)
    ("missing file", "fedsc", ["--data", "/nonexistent/file.h5"], "does not exist"),
    ("unknown name", "fedsc", ["--data", "PBMC_68k"], "unknown dataset name"),
    ("not hdf5 or table", "fedsc", ["--data", "{junk}"], "neither HDF5"),
    ("no counts", "fedsc", ["--data", "{nocounts}"], "holds no counts"),
    ("negative", "fedsc", ["--data", "{neg}"], "negative"),
    ("nan", "fedsc", ["--data", "{nan}"], "NaN"),
    ("log-normalised", "fedsc", ["--data", "{lognorm}"], "not integers"),
    ("label length", "fedsc", ["--data", "{short}"], "45 labels for 50 cells"),
    ("csv without header", "fedsc", ["--data", "{noheader}", "--n-clusters", "2"], "first line is numbers"),
    ("genes x cells without --transpose", "fedsc", ["--data", "{gxc}", "--n-clusters", "2"], "pass --transpose"),
    ("labels match the columns", "fedsc", ["--data", "{cxg}", "--labels", "{labels40}"], "probably genes x cells"),
    ("--layer on a plain h5", "fedsc", ["--data", "{ok}", "--layer", "counts"], "--layer is for .h5ad"),
    ("csv first column is data", "fedsc", ["--data", "{nonames}", "--n-clusters", "2"], "not increasing row numbers"),
    ("fewer cells than clients", "fedsc", ["--data", "{tiny}", "--clients", "8", "--partition", "iid"], "3 cells for 8 clients"),
    ("too many types", "fedsc", ["--data", "{ok}", "--types-per-client", "9"], "is more than the 4"),
    ("client with one cell", "fedsc", ["--data", "{tiny}", "--clients", "3", "--partition", "iid", "--n-genes", "10"],
     "every client needs at least 2"),
    ("batch size 1", "fedsc", ["--data", "{ok}", "--batch-size", "1"], "--batch-size must be at least 2"),
    ("negative n-genes", "fedsc", ["--data", "{ok}", "--n-genes", "-5"], "--n-genes must be positive"),
    ("n-clusters 1", "fedsc", ["--data", "{ok}", "--n-clusters", "1"], "--n-clusters must be at least 2"),
    ("n-clusters above cells", "fedsc", ["--data", "{ok}", "--n-clusters", "80"], "more than the 50 cells"),
    ("negative seed", "fedsc", ["--data", "{ok}", "--seed", "-1"], "--seed must be in [0, 2^32)"),
    ("seed too large", "fedsc", ["--data", "{ok}", "--seed", str(2 ** 32)], "--seed must be in [0, 2^32)"),
    ("label key on a table", "fedsc", ["--data", "{cxg}", "--label-key", "cell_type"], "--label-key is for HDF5"),
    ("dirichlet alpha 0", "fedsc", ["--data", "{ok}", "--partition", "dirichlet", "--dirichlet-alpha", "0"],
     "--dirichlet-alpha must be positive"),
    ("queue size 0", "fedmoco", ["--data", "{ok}", "--queue-size", "0"], "--queue-size must be at least 1"),
    ("temperature 0", "fedsimclr", ["--data", "{ok}", "--temperature", "0"], "--temperature must be positive"),
    ("temperature negative (moco)", "fedmoco", ["--data", "{ok}", "--temperature", "-1"], "--temperature must be positive"),
    ("eval-every negative", "fedsc", ["--data", "{ok}", "--eval-every", "-1"], "--eval-every must be 0"),
    ("centralized threads 0", "centralized", ["--data", "{ok}", "--threads", "0"], "--threads must be at least 1"),
    ("centralized n-components 0", "centralized", ["--data", "{ok}", "--n-components", "0"], "--n-components must be at least 1"),
    ("out is a directory", "fedsc", ["--data", "{ok}", "--out", "{dir}"], "is a directory"),
    ("out is not a results csv", "fedsc", ["--data", "{ok}", "--out", "{notresults}"], "not a results CSV"),
    ("out not writable", "fedsc", ["--data", "{ok}", "--out", "/proc/fedsc/r.csv"], "cannot write"),
    ("out names no file", "fedsc", ["--data", "{ok}", "--out", ""], "names no file"),
]


def _setup_only(name, argv):
    """What a script does before training: parse, check, resolve, load, partition."""
    args = common.parse_args(importlib.import_module(name).Args, argv)
    if name == "centralized":
        cli.check_args(args)
        cli.resolve(args, os.path.join(ROOT, "centralized.py"))
        return common.load(args)
    return common.setup(args)


@pytest.mark.parametrize("case,name,argv,expect", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_refused_before_training(case, name, argv, expect, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSC_DATA_DIR", str(tmp_path))
    files = dict(_bad_files(tmp_path), dir=str(tmp_path))
    argv = [a.format(**files) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "r.csv")]
    with pytest.raises(D.DataError, match=re.escape(expect)):
        _setup_only(name, argv)


def test_bad_input_exit_code_contract(tmp_path):
    """One subprocess: exit 2, a single `error:` line, no traceback, no row, no run folder."""
    out = str(tmp_path / "r.csv")
    bad = write_h5(tmp_path / "lognorm.h5", np.log1p(D.synthetic_counts(50, 40, seed=0)[0]), np.arange(50) % 2)
    p = run(["fedsc.py", "--data", bad, "--out", out])
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1 and "not integers" in p.stderr
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "runs")


def test_n_genes_above_the_gene_count_says_what_is_used(capsys):
    X, _ = D.synthetic_counts(n_cells=60, n_genes=30, seed=0)
    assert D.preprocess(X, 500)[0].shape[1] == 30
    assert "using all of them" in capsys.readouterr().out


def test_cli_flags_parse():
    a = parse("fedbyol", ["--no-ema", "--no_sg", "--local-epochs", "7", "--no-l2norm"])
    assert a.no_ema and a.no_sg and not a.no_predictor and a.local_epochs == 7 and not a.l2norm
    assert not parse("fedmoco", ["--no-symmetric"]).symmetric
    m2 = parse("fedmoco", ["--version", "2"])
    assert m2.version == 2 and m2.temperature == 0.2 and m2.method == "FedMoCoV2"  # resolved once
    assert parse("fedmoco", []).temperature == 0.07 and parse("fedmoco", ["--temperature", "0.5"]).temperature == 0.5
    with pytest.raises(SystemExit):
        parse("fedmoco", ["--version", "3"])
    assert "clients" not in vars(parse("centralized")) and "rounds" not in vars(parse("centralized"))


def test_recipe_tuned_reads_recipes_and_explicit_flags_win(tmp_path, monkeypatch):
    path = tmp_path / "recipes.json"
    path.write_text('{"recipes": {"FedSC": {"lr": 0.25, "rounds": 77, "local_epochs": 3}}}')
    monkeypatch.setattr(cli, "RECIPES", str(path))
    a = parse("fedsc", ["--recipe", "tuned"])
    assert (a.lr, a.rounds, a.local_epochs) == (0.25, 77, 3)
    a = parse("fedsc", ["--recipe", "tuned", "--rounds", "5"])
    assert (a.lr, a.rounds) == (0.25, 5)
    assert parse("fedsc", []).lr == 0.032  # the paper's recipe is the default
    with pytest.raises(D.DataError, match="no tuned recipe for FedBYOL"):
        parse("fedbyol", ["--recipe", "tuned"])


# ---------------------------------------------------------------------------------------------
# Download path (no network in tests: a closed local port, and file:// URLs)
# ---------------------------------------------------------------------------------------------
def test_download_failure_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSC_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(D, "SCDCC", "http://127.0.0.1:9/")
    with pytest.raises(D.DataError, match=f"put the file at {tmp_path}"):
        D.resolve_data("10X_PBMC")
    assert os.listdir(tmp_path) == []  # nothing half-written
    with pytest.raises(D.DataError, match="not downloadable"):
        D.resolve_data("baron_mouse_pancreas")


@pytest.mark.skipif(not os.path.exists(BLADDER), reason="real bladder file not available")
def test_download_verifies_checksum_and_writes_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSC_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(D, "SCDCC", "file://" + os.path.abspath(REAL) + "/")
    path = D.resolve_data("mouse_bladder")
    assert D.sha256sum(path) == D.BENCHMARKS["mouse_bladder"]["sha256"]
    bad = str(tmp_path / "bad.h5")
    with pytest.raises(D.DataError, match="sha256"):
        D.download("file://" + os.path.abspath(BLADDER), bad, "0" * 64)
    assert sorted(os.listdir(tmp_path)) == ["mouse_bladder_cell_top2000.h5"]


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def _h5ad(path, X, layers=None, raw=None, obs=None):
    def put(group, name, M):
        if sp.issparse(M):
            g = group.create_group(name)
            g.attrs["encoding-type"], g.attrs["shape"] = "csr_matrix", M.shape
            g["data"], g["indices"], g["indptr"] = M.data, M.indices, M.indptr
        else:
            group[name] = M
    with h5py.File(path, "w") as f:
        put(f, "X", X)
        for k, v in (layers or {}).items():
            put(f.require_group("layers"), k, v)
        if raw is not None:
            put(f.create_group("raw"), "X", raw)
        o = f.create_group("obs")
        for k, v in (obs or {}).items():
            o[k] = v
    return str(path)


def test_h5ad_reader_dense_and_csr_with_categorical_obs(tmp_path):
    X, y = D.synthetic_counts(n_cells=60, n_genes=30, seed=2)
    names = np.array(["B", "NK", "T", "mono"])
    for layout in ("dense", "csr"):
        path = _h5ad(tmp_path / f"{layout}.h5ad", X if layout == "dense" else sp.csr_matrix(X),
                     obs={"plain": names[y].astype("S")})
        with h5py.File(path, "a") as f:
            f["obs"].create_group("cell_type")
            f["obs"]["cell_type"]["codes"] = y.astype(np.int8)
            f["obs"]["cell_type"]["categories"] = names.astype("S")
        Xr, yr, label_names, used = D.read_counts(path, label_key="cell_type")
        Xr = Xr.toarray() if sp.issparse(Xr) else Xr
        assert np.array_equal(Xr, X) and np.array_equal(yr, y) and list(label_names) == list(names)
        assert used == "X" and np.array_equal(D.read_counts(path, label_key="plain")[1], y)
        with pytest.raises(D.DataError, match="no column 'donor'"):
            D.read_counts(path, label_key="donor")


def test_h5ad_layer_and_raw_hold_the_counts(tmp_path):
    X, y = D.synthetic_counts(n_cells=40, n_genes=20, seed=4)
    lib = X.sum(1, keepdims=True)
    norm = np.log1p(X / lib * 1e4).astype(np.float32)
    path = _h5ad(tmp_path / "n.h5ad", norm, layers={"counts": sp.csr_matrix(X)}, raw=X)
    with pytest.raises(D.DataError, match="not integers.*--layer"):
        D.read_counts(path)
    for layer, used in (("counts", "layers/counts"), ("raw", "raw/X")):
        Xr, _, _, what = D.read_counts(path, layer=layer)
        assert what.startswith(used) and np.array_equal(Xr.toarray() if sp.issparse(Xr) else Xr, X)
    with pytest.raises(D.DataError, match="no layers/spliced; layers are: counts"):
        D.read_counts(path, layer="spliced")


def test_h5_transpose_and_label_names(tmp_path):
    X, y = D.synthetic_counts(n_cells=30, n_genes=20, seed=5)
    names = np.array(["alpha", "beta", "delta", "gamma"])
    path = write_h5(tmp_path / "t.h5", X.T, y, label_names=names.astype("S"))
    Xr, yr, ln, _ = D.read_counts(path, transpose=True)
    assert np.array_equal(Xr, X) and list(ln) == list(names[np.unique(y)]) and np.array_equal(ln[yr], names[y])


def _write_10x(tmp, X, with_antibody=True):
    """X (cells x genes) as Cell Ranger writes it: an HDF5 (v3) and a gzipped mtx folder, genes x
    cells, plus one antibody-capture feature that is not a gene."""
    import gzip
    import scipy.io
    genes = np.array([f"Gene{i}" for i in range(X.shape[1])] + (["CD3_TotalSeqB"] if with_antibody else []))
    types = np.array(["Gene Expression"] * X.shape[1] + (["Antibody Capture"] if with_antibody else []))
    full = np.hstack([X, np.full((len(X), 1), 7.0)]) if with_antibody else X
    barcodes = np.array([f"AAACCTGAG{i:07d}-1" for i in range(len(X))])
    m = sp.csc_matrix(full.T.astype(np.int32))
    with h5py.File(tmp / "filtered_feature_bc_matrix.h5", "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"], g["shape"] = m.data, m.indices, m.indptr, np.array(m.shape)
        g["barcodes"] = barcodes.astype("S")
        feats = g.create_group("features")
        feats["id"], feats["name"], feats["feature_type"] = genes.astype("S"), genes.astype("S"), types.astype("S")
    folder = tmp / "filtered_feature_bc_matrix"
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(full.T.astype(np.int32)))
    with gzip.open(folder / "features.tsv.gz", "wt") as f:
        f.writelines(f"ENSG{i:011d}\t{g}\t{t}\n" for i, (g, t) in enumerate(zip(genes, types)))
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as f:
        f.writelines(b + "\n" for b in barcodes)
    return str(tmp / "filtered_feature_bc_matrix.h5"), str(folder), barcodes


def test_10x_h5_and_mtx_folder_readers(tmp_path):
    X, y = D.synthetic_counts(n_cells=40, n_genes=25, seed=9)
    h5, folder, barcodes = _write_10x(tmp_path, X)
    for path in (h5, folder):
        names = {}
        Xr, yr, _, used = D.read_counts(path, names=names)
        assert np.array_equal(Xr.toarray(), X) and yr is None and "10x" in used  # the antibody row is dropped
        assert list(names["genes"]) == [f"Gene{i}" for i in range(25)] and list(names["barcodes"]) == list(barcodes)
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="not a 10x matrix folder"):
        D.read_counts(str(tmp_path / "empty"))


def test_a_10x_folder_end_to_end_keeps_barcodes(tmp_path):
    X, y = D.synthetic_counts(n_cells=120, n_genes=80, seed=10)
    _, folder, barcodes = _write_10x(tmp_path, X, with_antibody=False)
    (tmp_path / "labels.txt").write_text("\n".join(str(v) for v in y))
    out = str(tmp_path / "r.csv")
    p = run(["fedsc.py", "--data", folder, "--labels", str(tmp_path / "labels.txt"), "--clients", "2",
             "--out", out] + TINY)
    assert p.returncode == 0, p.stderr
    cl = pd.read_csv(os.path.join(tmp_path, "runs", rows(out)["run"][0], "clusters.csv"))
    assert list(cl["barcode"]) == list(barcodes[cl["cell"]])


def test_csv_reader_with_labels_file(tmp_path):
    X, y = D.synthetic_counts(n_cells=40, n_genes=20, seed=3)
    pd.DataFrame(X).to_csv(tmp_path / "c.csv")  # a row-number index column, as pandas writes
    pd.Series(np.array(["a", "b", "c", "d"])[y], name="label").to_csv(tmp_path / "l.csv", index=False)
    Xr, yr, names, _ = D.read_counts(str(tmp_path / "c.csv"), labels=str(tmp_path / "l.csv"))
    assert np.allclose(Xr, X) and np.array_equal(yr, np.unique(y, return_inverse=True)[1])
    assert list(names) == ["a", "b", "c", "d"][: len(np.unique(y))]


# ---------------------------------------------------------------------------------------------
# Preprocessing, masking, partition
# ---------------------------------------------------------------------------------------------
def hvg_direct(X_log, n_top):
    """scanpy's seurat flavour written with pandas, as scanpy does it (pd.cut + groupby)."""
    X = np.expm1(X_log)
    mean, var = X.mean(0), X.var(0, ddof=1)
    disp = np.log(var / mean)
    df = pd.DataFrame({"m": np.log1p(mean), "d": disp})
    df["bin"] = pd.cut(df["m"], bins=20)
    g = df.groupby("bin", observed=False)["d"]
    mu, sd = g.mean(), g.std(ddof=1)
    one = sd.isnull()
    sd[one], mu[one] = mu[one].values, 0
    z = (df["d"].values - mu[df["bin"]].values) / sd[df["bin"]].values
    cut = np.sort(z[~np.isnan(z)])[::-1][n_top - 1]
    return np.nan_to_num(z) >= cut


def test_hvg_matches_pandas_computation():
    X, _ = D.synthetic_counts(n_cells=300, n_genes=400, seed=5)
    X = X[:, X.sum(0) > 0]
    lib = X.sum(1, keepdims=True)
    X_log = np.log1p(X * np.median(lib) / lib)
    for n in (50, 100, 200):
        ours = D.hvg_seurat(X_log, n)
        assert np.array_equal(ours, hvg_direct(X_log, n))
        assert ours.sum() >= n




def test_preprocess_scales_each_gene():
    X, _ = D.synthetic_counts(n_cells=200, n_genes=150, seed=6)
    X[:, 0] = 0  # an empty gene is removed first
    Xp, cells, genes = D.preprocess(X, 60)
    assert Xp.dtype == np.float32 and 0 not in genes and Xp.shape == (200, len(genes))
    assert np.allclose(Xp.mean(0), 0, atol=1e-5) and np.allclose(Xp.std(0, ddof=1), 1, atol=1e-4)


def test_preprocess_sparse_equals_dense_and_a_direct_computation():
    X, _ = D.synthetic_counts(n_cells=150, n_genes=120, seed=7)
    X[3] = 0  # an empty cell is removed
    dense, cells, genes = D.preprocess(X, 40)
    sparse, cells2, genes2 = D.preprocess(sp.csr_matrix(X), 40)
    assert np.array_equal(cells, cells2) and np.array_equal(genes, genes2) and np.array_equal(dense, sparse)
    assert 3 not in cells
    # the same steps written out densely, gene selection from the pandas reference
    Xc = X[cells][:, X.sum(0) >= 1]
    lib = Xc.sum(1, keepdims=True)
    L = np.log1p(Xc * np.median(lib) / lib)
    sel = hvg_direct(L, 40)
    ref = (L[:, sel] - L[:, sel].mean(0)) / L[:, sel].std(0, ddof=1)
    assert np.allclose(dense, ref, atol=1e-5)


def _federated_vs_pooled(X, bounds, n_genes):
    sites = [X[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    pooled, cells, genes = D.preprocess(X, n_genes)
    fed, fed_cells, fed_genes = federated.preprocess_federated(sites, n_genes)
    assert np.array_equal(genes, fed_genes)  # the same genes
    assert np.array_equal(cells, np.concatenate([c + a for c, a in zip(fed_cells, bounds)]))
    assert np.abs(pooled - np.concatenate(fed)).max() < 1e-5  # the same scaled matrix


def test_federated_preprocessing_equals_pooled_on_uneven_sites():
    X, _ = D.synthetic_counts(n_cells=400, n_genes=300, seed=8)
    X[5] = 0  # an empty cell on site 0
    X[:, 7] = 0  # an empty gene
    for n in (50, 120):
        _federated_vs_pooled(X, [0, 13, 60, 251, 400], n)  # four sites of 13, 47, 191 and 149 cells
    sites = federated.LocalSites([{"lib": np.array([5.0, 1, 9])}, {"lib": np.array([4.0])}])
    assert federated.federated_kth(sites, 2, 100) == 4  # the 2nd smallest of 5, 1, 9, 4


@pytest.mark.parametrize("name", ["10X_PBMC_top2000.h5", "mouse_bladder_cell_top2000.h5"])
def test_federated_preprocessing_equals_pooled_on_the_benchmarks(name):
    path = os.path.join(REAL, name)
    if not os.path.exists(path):
        pytest.skip("benchmark file not available")
    X, y, _, _ = D.read_counts(path)
    parts = D.partition(y, 4, "class", 2 if "PBMC" in name else 4, seed=0)
    order = np.concatenate(parts)  # the cells site by site, as the paper's class split puts them
    bounds = np.cumsum([0] + [len(p) for p in parts]).tolist()
    _federated_vs_pooled(X[order], bounds, 500 if "PBMC" in name else 1500)


def test_mask_rate_and_scaling():
    x = torch.ones(400, 500)
    g = torch.Generator().manual_seed(0)
    for p in (0.5, 0.9):
        for v in common.two_views(x, p, g):
            assert abs((v == 0).float().mean().item() - p) < 0.01
            assert torch.allclose(v[v != 0], torch.tensor(1 / (1 - p)))
    a, b = common.two_views(x, 0.9, g)
    assert not torch.equal(a, b) and abs(((a == 0) & (b == 0)).float().mean().item() - 0.81) < 0.01  # independent


def test_partition_class_heap():
    sizes = [1292, 702, 606, 459, 450, 332, 295, 135]  # PBMC
    y = np.repeat(np.arange(8), sizes)
    parts = D.partition(y, 4, "class", 2, seed=0)
    for k, p in enumerate(parts):
        assert sorted(set(y[p])) == [2 * k, 2 * k + 1] and len(p) == sizes[2 * k] + sizes[2 * k + 1]
    allp = np.concatenate(parts)
    assert len(allp) == len(np.unique(allp)) == len(y)
    yb = np.repeat(np.arange(16), [717, 357, 344, 316, 236, 224, 131, 80, 75, 64, 44, 38, 41, 36, 30, 13])
    c1 = D.partition(yb, 4, "class", 1, seed=0)  # types 4..15 are used by no client
    assert [sorted(set(yb[p])) for p in c1] == [[0], [1], [2], [3]]
    c8 = D.partition(yb, 4, "class", 8, seed=0)  # each type halved; clients 0/2 and 1/3 share types
    assert [sorted(set(yb[p])) for p in c8] == [list(range(8)), list(range(8, 16))] * 2
    assert len(np.intersect1d(c8[0], c8[2])) == 0 and len(np.concatenate(c8)) == len(yb)
    assert abs(len(c8[0]) - len(c8[2])) <= 8
    c4 = D.partition(yb, 4, "class", 4, seed=0)
    assert [len(p) for p in c4] == [1734, 671, 221, 120]  # label order, not sorted size order
    again, other = D.partition(yb, 4, "class", 8, seed=0), D.partition(yb, 4, "class", 8, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(c8, again))
    assert not all(np.array_equal(a, b) for a, b in zip(c8, other))


def test_partition_iid_and_dirichlet():
    y = np.repeat(np.arange(5), 100)
    iid = D.partition(y, 3, "iid", seed=0)
    assert sorted(len(p) for p in iid) == [166, 167, 167] and len(np.unique(np.concatenate(iid))) == 500
    dr = D.partition(y, 4, "dirichlet", alpha=0.3, seed=0)
    assert len(np.unique(np.concatenate(dr))) == sum(len(p) for p in dr) == 500
    assert min(len(p) for p in dr) >= 10
    assert all(np.array_equal(a, b) for a, b in zip(dr, D.partition(y, 4, "dirichlet", alpha=0.3, seed=0)))


def test_batching_rule():
    g = torch.Generator().manual_seed(0)
    assert [len(b) for b in common.batches(300, 128, g)] == [128, 128]  # incomplete last batch dropped
    assert [len(b) for b in common.batches(100, 128, g)] == [100]  # no full batch: one batch of all
    assert common.batches(1, 128, g) == []  # BatchNorm needs two cells


# ---------------------------------------------------------------------------------------------
# Aggregation, schedules, FedSC's download rule
# ---------------------------------------------------------------------------------------------
def test_fedavg_is_cell_weighted_mean_including_bn_stats():
    torch.manual_seed(0)
    nets = [common.backbone(10) for _ in range(3)]
    for n in nets:
        n.train()(torch.randn(8, 10))  # move the BN running stats apart
    states, counts = [n.state_dict() for n in nets], [10, 30, 60]
    avg = common.fedavg(states, counts)
    for key in states[0]:
        if states[0][key].is_floating_point():
            hand = (10 * states[0][key] + 30 * states[1][key] + 60 * states[2][key]) / 100
            assert torch.allclose(avg[key], hand, atol=1e-6), key
    assert "1.running_mean" in avg and not torch.allclose(avg["1.running_mean"], states[0]["1.running_mean"])


def test_federated_lloyd_equals_pooled_lloyd_and_scores_equal_pooled():
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 600)
    h = rng.normal(size=(600, 5)) + 3 * np.eye(5)[y]
    init = h[[0, 1, 2, 3]]
    sites = [h[:50], h[50:320], h[320:]]  # uneven sites
    states = [{"h": s} for s in sites]
    [(cent, inertia)] = federated.federated_lloyd(federated.LocalSites(states), [init.copy()])
    labels = [s["assigned"][0] for s in states]  # each site's labels stay on the site
    ref = KMeans(4, init=init, n_init=1, algorithm="lloyd", tol=0, max_iter=300).fit(h)
    assert np.allclose(cent, ref.cluster_centers_, atol=1e-10) and inertia == pytest.approx(ref.inertia_)
    assert np.array_equal(np.concatenate(labels), ref.labels_)
    pred = np.concatenate(labels)
    table = sum(federated.site_contingency(y[a:b], l, 4, 4) for (a, b), l in zip([(0, 50), (50, 320), (320, 600)], labels))
    ari, nmi = federated.scores_from_contingency(table)
    assert ari == pytest.approx(100 * adjusted_rand_score(y, pred)) and nmi == pytest.approx(100 * normalized_mutual_info_score(y, pred))
    real, sent = federated.site_assign, []
    federated.site_assign = lambda *a: (lambda out: (sent.append(out[1]), out)[1])(real(*a))
    try:
        # seeded from the sites' centroids only
        _, _, fed_inertia = federated.federated_kmeans(federated.LocalSites([{"h": s} for s in sites]), 4, seed=0)
    finally:
        federated.site_assign = real
    # what the sites send the server: per-cluster sums (4 x 5), counts (4), inertia and a count
    assert sent and all(np.shape(s[0]) == (4, 5) and np.shape(s[1]) == (4,) and np.ndim(s[2]) == np.ndim(s[3]) == 0
                        for s in sent)
    assert fed_inertia <= 1.001 * KMeans(4, n_init=10, random_state=0).fit(h).inertia_


def test_lr_and_tau_schedules_follow_their_formulas():
    a = parse("fedbyol", ["--rounds", "10", "--lr", "0.2"])
    lrs = [common.learning_rate(a, t) for t in range(10)]
    assert lrs == pytest.approx([0.1 * (1 + math.cos(math.pi * t / 10)) for t in range(10)])
    assert common.learning_rate(parse("fedbyol", ["--lr-schedule", "constant", "--lr", "0.2"]), 7) == 0.2
    fedbyol = importlib.import_module("fedbyol")
    c = parse("fedbyol", ["--tau-schedule", "cosine", "--tau", "0.9"])
    taus = [fedbyol.target_tau(k, 40, c) for k in (0, 10, 20, 40, 50)]
    assert taus == pytest.approx([0.9, 1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2, 0.95, 1.0, 1.0])
    assert fedbyol.target_tau(13, 40, parse("fedbyol")) == 0.99


def test_ema_update_follows_its_formula():
    on, tg = common.backbone(5), common.backbone(5)
    want = {k: 0.99 * p.detach() + 0.01 * dict(on.named_parameters())[k].detach() for k, p in tg.named_parameters()}
    common.ema_(tg, on, 0.99)
    assert all(torch.allclose(p, want[k]) for k, p in tg.named_parameters())


def test_fedsc_mu_trajectory_scaled_saturates_relative_does_not():
    """The divergence d shrinks with the lr (cosine decay) or grows past its round-2 value (large
    lr). 'scaled' freezes lambda at round 2, so mu goes to 0 or sticks at 1; 'relative' is free of
    d's scale: mu = alpha whenever d is steady, above alpha only on a jump, and the same
    trajectory for d and 10 d."""
    fedsc = importlib.import_module("fedsc")
    scaled, rel = parse("fedsc"), parse("fedsc", ["--mu-rule", "relative"])
    shrinking = [2.0 * (1 + math.cos(math.pi * t / 300)) / 2 + 1e-3 for t in range(300)]  # cosine lr
    growing = [2.0 * (1 + 3 * t / 300) for t in range(300)]
    mus = lambda ds, a: [fedsc.decay_rate(d, st, a) for st in [{}] for d in ds]
    assert mus(shrinking, scaled)[-1] < 0.01 and mus(growing, scaled)[-1] == 1.0  # both ends
    assert mus([3.0] * 20, rel) == pytest.approx([0.7] * 20)
    for ds in (shrinking, growing):
        r = mus(ds, rel)
        assert r == pytest.approx(mus([10 * d for d in ds], rel))  # the lr's scale drops out
        assert 0.3 < min(r[1:270]) and max(r) < 1.0  # a useful range until the lr is nearly 0
    jump = mus([1.0] * 10 + [3.0], rel)
    assert jump[-1] == 1.0 and jump[-2] == pytest.approx(0.7)  # a jump in divergence raises mu
    # a naive loop: dbar is the EMA (0.9) of the earlier divergences, mu = min(alpha d / dbar, 1)
    dbar, want = None, []
    for d in growing:
        dbar = d if dbar is None else dbar
        want.append(min(0.7 * d / dbar, 1.0))
        dbar = 0.9 * dbar + 0.1 * d
    assert mus(growing, rel) == pytest.approx(want)
    # compounding growth (a client at mu = 1 drifts away, d +10% a round): 'relative' sticks at 1,
    # 'bounded' stays at alpha and equals 'relative' capped at alpha, also on the other trajectories
    bounded = parse("fedsc", ["--mu-rule", "bounded"])
    compounding = [0.5 * 1.1 ** t for t in range(40)]
    assert mus(compounding, rel)[20:] == [1.0] * 20
    assert mus(compounding, bounded)[20:] == pytest.approx([0.7] * 20)
    for ds in (shrinking, growing, compounding, [1.0] * 10 + [3.0]):
        assert mus(ds, bounded) == pytest.approx([min(m, 0.7) for m in mus(ds, rel)])


def test_fedsc_mu_rule_and_ema_merge():
    fedsc = importlib.import_module("fedsc")
    args = parse("fedsc")
    state = {}
    assert fedsc.decay_rate(2.0, state, args) == pytest.approx(0.7)  # first EMA: mu = alpha
    assert state["lam"] == pytest.approx(0.35)
    assert fedsc.decay_rate(1.0, state, args) == pytest.approx(0.35)  # lambda frozen: mu = lambda d
    assert fedsc.decay_rate(5.0, state, args) == 1.0  # capped at 1
    lit = parse("fedsc", ["--mu-rule", "literal"])
    assert fedsc.decay_rate(2.0, {}, lit) == pytest.approx(0.35) and fedsc.decay_rate(0.5, {}, lit) == 1.0
    local = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    glob = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    merged = fedsc.ema_merge(local, glob, 0.25)
    assert torch.allclose(merged["w"], 0.25 * local["w"] + 0.75 * glob["w"])
    a, b = common.backbone(6), common.backbone(6)
    flat = torch.cat([(a.state_dict()[k] - p).flatten() for k, p in b.named_parameters()])
    assert fedsc.divergence(a.state_dict(), b) == pytest.approx(flat.norm().item(), rel=1e-5)


def _client(name, argv=(), n_genes=20, n=16):
    mod = importlib.import_module(name)
    args = parse(name, argv)
    torch.manual_seed(0)
    model = mod.make_model(n_genes, args)
    return mod, args, common.make_client(0, torch.randn(n, n_genes), model, 0)


def test_fedsc_download_round0_then_merge():
    fedsc, args, client = _client("fedsc")
    glob = {k: common.weights(client.model[k]) for k in fedsc.UPLOAD}
    assert fedsc.download(client, glob, args) == {}
    with torch.no_grad():
        for p in client.model["online"].parameters():
            p.add_(0.1)  # pretend local training moved the weights
    before = copy.deepcopy(client.model["online"].state_dict())
    log = fedsc.download(client, glob, args)
    assert log["mu"] == pytest.approx(0.7)
    after = client.model["online"].state_dict()
    for k in before:
        if before[k].is_floating_point():
            assert torch.allclose(after[k], 0.7 * before[k] + 0.3 * glob["online"][k], atol=1e-6)
    target = client.model["target"].state_dict()  # the target is local: untouched by the merge
    assert all(torch.equal(target[k], glob["online"][k]) for k in target)


# ---------------------------------------------------------------------------------------------
# Losses against naive loops; stop-gradients
# ---------------------------------------------------------------------------------------------
def test_nt_xent_matches_naive_loop():
    fedsimclr = importlib.import_module("fedsimclr")
    torch.manual_seed(0)
    z1, z2, t = torch.randn(5, 8), torch.randn(5, 8), 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n, total = len(z1), 0.0
    for i in range(2 * n):  # each anchor: one positive, 2B-2 negatives
        pos = (i + n) % (2 * n)
        den = sum(torch.exp(z[i] @ z[j] / t) for j in range(2 * n) if j != i)
        total += -torch.log(torch.exp(z[i] @ z[pos] / t) / den)
    assert fedsimclr.nt_xent(z1, z2, t).item() == pytest.approx(total.item() / (2 * n), rel=1e-5)
    assert importlib.import_module("centralized").supcon_loss(z1, z2, t).item() == pytest.approx(total.item() / (2 * n), rel=1e-5)


def test_moco_contrast_matches_naive_loop():
    fedmoco = importlib.import_module("fedmoco")
    torch.manual_seed(1)
    q, k = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(6, 8), dim=1)
    queue, t = F.normalize(torch.randn(8, 11), dim=0), 0.2
    total = 0.0
    for i in range(6):  # positive: its own key; negatives: every queue column
        pos = torch.exp(q[i] @ k[i] / t)
        total += -torch.log(pos / (pos + sum(torch.exp(q[i] @ queue[:, j] / t) for j in range(11))))
    assert fedmoco.contrast(q, k, queue, t).item() == pytest.approx(total.item() / 6, rel=1e-5)


def test_byol_and_simsiam_losses_match_naive_loops():
    fedbyol, args, c = _client("fedbyol")
    v1, v2 = torch.randn(16, 20), torch.randn(16, 20)
    m = c.model
    p1, p2, z1, z2 = m["predictor"](m["online"](v1)), m["predictor"](m["online"](v2)), m["target"](v1), m["target"](v2)
    cos = lambda a, b: (a @ b) / (a.norm() * b.norm())
    naive = sum((2 - 2 * cos(p1[i], z2[i])) + (2 - 2 * cos(p2[i], z1[i])) for i in range(16)) / 16
    assert fedbyol.loss_fn(m, v1, v2, args).item() == pytest.approx(naive.item(), rel=1e-5)
    fedsimsiam, args, c = _client("fedsimsiam")
    m = c.model
    z1, z2 = m["online"](v1), m["online"](v2)
    p1, p2 = m["predictor"](z1), m["predictor"](z2)
    naive = sum(-0.5 * cos(p1[i], z2[i]) - 0.5 * cos(p2[i], z1[i]) for i in range(16)) / 16
    assert fedsimsiam.loss_fn(m, v1, v2, args).item() == pytest.approx(naive.item(), rel=1e-5)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,argv", [("fedsimsiam", []), ("fedbyol", []), ("fedbyol", ["--no-ema"]), ("fedsc", [])])
def test_stop_gradient(name, argv):
    """The loss's gradient equals the gradient of the same loss with the predicted targets replaced
    by constants: nothing flows through the stop-gradient branch, whatever requires_grad says."""
    mod, args, c = _client(name, argv)
    m = c.model.requires_grad_(True)  # the target too, so only the loss's own stop-gradient can stop it
    v1, v2 = torch.randn(16, 20), torch.randn(16, 20)
    got = _grads(m, mod.loss_fn(m, v1, v2, args))
    branch = m["online"] if name == "fedsimsiam" or getattr(args, "no_ema", False) else m["target"]
    with torch.no_grad():
        t1, t2 = branch(v1), branch(v2)  # constants
    p1, p2 = m["predictor"](m["online"](v1)), m["predictor"](m["online"](v2))
    if name == "fedsimsiam":
        ref = -0.5 * (F.cosine_similarity(p1, t2, dim=-1).mean() + F.cosine_similarity(p2, t1, dim=-1).mean())
    else:
        ref = (4 - 2 * F.cosine_similarity(p1, t2, dim=-1) - 2 * F.cosine_similarity(p2, t1, dim=-1)).mean()
    want = _grads(m, ref)
    assert got.keys() == want.keys() and not any(k.startswith("target") for k in got)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)


def test_byol_without_stop_gradient_trains_the_target():
    fedbyol, args, c = _client("fedbyol", ["--no-sg"])
    got = _grads(c.model, fedbyol.loss_fn(c.model, torch.randn(16, 20), torch.randn(16, 20), args))
    assert any(k.startswith("target") for k in got)


def test_moco_queue_wraps_around_with_short_batches():
    fedmoco = importlib.import_module("fedmoco")
    state = {"queue": torch.zeros(4, 10), "ptr": 0}
    keys = [torch.full((n, 4), float(i + 1)) for i, n in enumerate([4, 3, 5, 12])]
    fedmoco.enqueue(state, keys[0])
    fedmoco.enqueue(state, keys[1])
    assert state["ptr"] == 7
    fedmoco.enqueue(state, keys[2])  # columns 7, 8, 9, 0, 1
    assert state["ptr"] == 2
    assert state["queue"][0].tolist() == [3, 3, 1, 1, 2, 2, 2, 3, 3, 3]
    fedmoco.enqueue(state, keys[3])  # longer than the queue: the last 10 keys fill it
    assert state["ptr"] == 2 and torch.all(state["queue"] == 4)


# ---------------------------------------------------------------------------------------------
# What crosses to the server; learning
# ---------------------------------------------------------------------------------------------
def _tiny_data(n_cells=60, n_genes=20):
    X, y = D.synthetic_counts(n_cells=n_cells, n_genes=n_genes, n_types=2, seed=0)
    half = n_cells // 2
    return D.Data(D.preprocess(X, n_genes)[0], y, [np.arange(half), np.arange(half, n_cells)], 2, np.arange(n_cells))


@pytest.mark.parametrize("name,argv,uploaded,local", [
    ("fedsc", [], {"online", "predictor"}, {"target"}),
    ("fedbyol", [], {"online", "predictor"}, {"target"}),
    ("fedsimclr", [], {"online"}, set()),
    ("fedmoco", [], {"online"}, {"key"}),
    ("fedmoco", ["--version", "2"], {"online"}, {"key"}),
    ("fedsimsiam", [], {"online", "predictor"}, set()),
])
def test_server_receives_only_weights_and_counts(name, argv, uploaded, local):
    """Run two real rounds through common.federate and record everything the server's aggregate
    receives: exactly the UPLOAD modules' weights (shapes of the model's own tensors) and each
    client's cell count; no cell, no embedding, no target/key encoder, no queue."""
    mod = importlib.import_module(name)
    args = parse(name, list(argv) + ["--rounds", "2", "--local-epochs", "1", "--batch-size", "8", "--queue-size", "37"]
                 if name == "fedmoco" else list(argv) + ["--rounds", "2", "--local-epochs", "1", "--batch-size", "8"])
    data = _tiny_data()
    seen = []
    aggregate = lambda uploads: (seen.append(uploads), mod.aggregate(uploads))[1]
    torch.manual_seed(0)
    model = mod.make_model(data.X.shape[1], args)
    common.federate(args, data, model, mod.download, mod.local_update, mod.upload, aggregate)
    assert set(mod.UPLOAD) == uploaded and set(model.keys()) == uploaded | local
    shapes = {(key, k): tuple(v.shape) for key in uploaded for k, v in model[key].state_dict().items()}
    for uploads in seen:
        assert [n for _, n in uploads] == [30, 30]
        for weights, _ in uploads:
            assert {(key, k): tuple(v.shape) for key, s in weights.items() for k, v in s.items()} == shapes
            assert all(30 not in v.shape and 37 not in v.shape for s in weights.values() for v in s.values())


@pytest.mark.parametrize("name", ["fedsc", "fedmoco"])
def test_two_clients_at_once_give_the_same_weights(name):
    """--threads 2 trains two clients at a time; each has its own RNG, so the weights are the same bits."""
    mod, data, out = importlib.import_module(name), _tiny_data(), []
    for threads in ("1", "2"):
        args = parse(name, ["--rounds", "3", "--local-epochs", "2", "--batch-size", "8", "--threads", threads])
        torch.manual_seed(0)
        model = mod.make_model(data.X.shape[1], args)
        common.federate(args, data, model, mod.download, mod.local_update, mod.upload, mod.aggregate)
        out.append(model.state_dict())
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])


LEARN = {  # method -> ARI it must reach on separable synthetic data (PCA: 99; untrained encoder: 2)
    ("fedsimclr", ()): 80, ("fedmoco", ()): 75, ("fedmoco", ("--version", "2")): 75,
    ("fedsimsiam", ("--predictor", "mlp")): 15, ("fedbyol", ()): 15, ("fedsc", ()): 15}  # linear SimSiam collapses


@pytest.fixture(scope="module")
def separable():
    X, y = D.synthetic_counts(n_cells=400, n_genes=200, n_types=4, seed=0)
    Xp, cells, _ = D.preprocess(X, 200)
    return D.Data(Xp, y[cells], [np.arange(0, 400, 2), np.arange(1, 400, 2)], 4, cells)


def _learn(mod, args, data, broken=False):
    loss_fn = mod.loss_fn
    if broken:  # the positives are views of *other* cells: nothing to learn from
        mod.loss_fn = lambda model, v1, v2, *rest: loss_fn(model, v1, v2[torch.randperm(len(v2))], *rest)
    try:
        torch.manual_seed(0)
        model = mod.make_model(data.X.shape[1], args)
        common.federate(args, data, model, mod.download, mod.local_update, mod.upload, mod.aggregate)
    finally:
        mod.loss_fn = loss_fn
    return common.cluster_metrics(common.embed(args, model, data.X), data.y, 4, 0)[0]["ari"]


@pytest.mark.parametrize("name,argv", list(LEARN), ids=[n + "".join(a) for n, a in LEARN])
def test_each_method_learns_and_a_broken_loss_does_not(name, argv, separable):
    mod = importlib.import_module(name)
    args = parse(name, list(argv) + ["--rounds", "15", "--local-epochs", "3", "--batch-size", "64", "--lr", "0.3",
                                     "--mask-rate", "0.5", "--partition", "iid", "--clients", "2"])
    good, bad = _learn(mod, args, separable), _learn(mod, args, separable, broken=True)
    assert good >= LEARN[(name, argv)] > bad, (good, bad)


# ---------------------------------------------------------------------------------------------
# Results files and the benchmark driver
# ---------------------------------------------------------------------------------------------
def test_collapse_signal():
    rng = np.random.default_rng(0)
    line = np.outer(rng.normal(size=500), rng.normal(size=60)) + 1e-6 * rng.normal(size=(500, 60))
    spread = rng.normal(size=(500, 60))
    assert common.effective_rank(line) < 1.1 and common.collapsed(line, common.effective_rank(line))
    assert common.effective_rank(spread) > 45 and not common.collapsed(spread, common.effective_rank(spread))
    assert not common.collapsed(line[:, :2], 1.0)  # a 2-d embedding (PCA-raw) is not judged
    s = np.linalg.svd(spread - spread.mean(0), compute_uv=False)  # against the SVD definition
    assert common.effective_rank(spread) == pytest.approx(np.exp(-(s / s.sum() * np.log(s / s.sum())).sum()))
    merged = federated.merge_scatter([federated.site_scatter(spread[a:b]) for a, b in ((0, 30), (30, 310), (310, 500))])
    assert federated.rank_from_scatter(merged[2]) == pytest.approx(common.effective_rank(spread))  # sites merge exactly


def test_append_row_keeps_every_row(tmp_path):
    path = str(tmp_path / "r.csv")
    runs.append_row(path, {"a": 1, "b": 2})
    runs.append_row(path, {"a": 3, "c": 4})
    r = pd.read_csv(path)
    assert r["a"].tolist() == [1, 3] and list(r.columns) == ["a", "b", "c"]
    runs.append_row(path, {"a": 5, "config_id": "012345678901", "commit": "1234e56"})
    r = pd.read_csv(path, dtype=runs.TEXT_COLUMNS)
    assert r["config_id"].iloc[-1] == "012345678901" and r["commit"].iloc[-1] == "1234e56"  # hashes stay text
    assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.csv.lock"]  # no temporary file left


def test_benchmark_reruns_only_rows_whose_code_changed(synth, tmp_path, monkeypatch, capsys):
    import benchmark
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in os.listdir(ROOT):
        if f.endswith(".py"):
            (repo / f).write_text(open(os.path.join(ROOT, f)).read())
    res = str(tmp_path / "results")
    monkeypatch.setattr(benchmark, "ROOT", str(repo))
    monkeypatch.setattr(benchmark, "plan", lambda exp, seeds: [
        (name, f"{name}.py", ["--data", synth, "--clients", "2", "--types-per-client", "2"] + TINY, s)
        for name in ("fedsimclr", "fedsimsiam") for s in seeds])
    assert benchmark.execute(["table3"], [0, 1], 2, res, []) == 0
    assert len(pd.read_csv(os.path.join(res, "table3.csv"))) == 4
    assert benchmark.execute(["table3"], [0, 1], 2, res, []) == 0  # everything cached
    assert "table3: 0 runs to do, 4 already have a row" in capsys.readouterr().out
    with open(repo / "fedsimclr.py", "a") as f:
        f.write("# a one-line change\n")
    assert benchmark.execute(["table3"], [0, 1], 2, res, []) == 0
    out = capsys.readouterr().out
    assert "table3: 2 runs to do, 2 already have a row" in out and "fedsimsiam.py" not in out.split("runs to do")[1]
    r = pd.read_csv(os.path.join(res, "table3.csv"))
    assert len(r) == 6 and r.groupby("method")["code"].nunique().to_dict() == {"FedSimCLR": 2, "FedSimSiam": 1}
    assert len(os.listdir(os.path.join(res, "logs", "table3"))) == 6  # no log overwritten
    assert benchmark.execute(["table2"], [0], 2, res, []) == 0  # another experiment runs its own rows
    assert "table2: 2 runs to do, 0 already have a row" in capsys.readouterr().out
    # tables use the current code's rows only, and never ad-hoc runs
    pd.concat([r, r]).to_csv(os.path.join(res, "runs.csv"), index=False)
    assert len(benchmark.all_rows(res)) == 6 + 2  # table3's and table2's rows, not runs.csv's
    got = benchmark.rows_for(benchmark.all_rows(res), "fedsimclr.py", ["--data", synth, "--clients", "2",
                             "--types-per-client", "2"] + TINY, [0, 1], [], benchmark.Missing())
    assert len(got) == 2 and set(got["code"]) == {runs.code_hash(str(repo / "fedsimclr.py"))}
    # --match: only the runs whose command holds every text given
    assert benchmark.execute(["table3"], [2], 2, res, [], match=["fedsimsiam.py", "--types-per-client 2"]) == 0
    assert "table3: 1 runs to do, 0 already have a row" in capsys.readouterr().out
    assert benchmark.execute(["table3"], [2], 2, res, [], match=["fedsimclr.py", "--recipe tuned"]) == 0
    assert "table3: 0 runs to do, 0 already have a row" in capsys.readouterr().out


def test_partial_tables_are_printed_not_published(synth, tmp_path, monkeypatch):
    import benchmark
    res = str(tmp_path / "results")
    monkeypatch.setattr(benchmark, "plan", lambda exp, seeds: [
        ("FedSC", "fedsc.py", ["--data", synth, "--clients", "2", "--types-per-client", "2"] + TINY, s) for s in seeds])
    monkeypatch.setattr(benchmark, "build", lambda exp, df, seeds, overrides, results: (
        "table", benchmark.Missing([("fedsc.py", s) for s in seeds if s not in set(df.get("seed", []))])))
    assert benchmark.execute(["table3"], [0], 1, res, []) == 0
    assert benchmark.write_tables(["table3"], [0, 1], res, [], publish=True) == {}  # seed 1 is missing
    assert not os.path.exists(os.path.join(res, "table3.md"))
    done = benchmark.write_tables(["table3"], [0], res, [], publish=True)
    assert "table3" in done and os.path.exists(os.path.join(res, "table3.md"))
    assert f"`{runs.git_commit()}`" in done["table3"][1]  # provenance names the rows' commit


def one_method_benchmark(benchmark, monkeypatch, synth):
    """The benchmark shrunk to FedSimCLR with tiny settings on the synthetic file, no centralized rows."""
    monkeypatch.setattr(benchmark, "T1_DATASETS", [synth])
    monkeypatch.setattr(benchmark, "DATASETS", [synth])
    monkeypatch.setattr(benchmark, "SHORT", {synth: "synth"})
    monkeypatch.setattr(benchmark, "FED", [("FedSimCLR", "fedsimclr.py", ["--clients", "2", "--types-per-client", "2"] + TINY)])
    monkeypatch.setattr(benchmark, "CENTRAL", [])


def test_table1_is_published_with_only_its_paper_rows_pending(synth, tmp_path, monkeypatch):
    """Table 1 goes out when only --recipe paper runs are missing: their rows read pending with no
    mean of the seeds that are in, and the note counts them; a missing tuned run, or no tuned
    recipe at all, keeps it out, and a table that is no longer complete loses its .md."""
    import benchmark
    res = str(tmp_path / "results")
    one_method_benchmark(benchmark, monkeypatch, synth)
    assert benchmark.execute(["table1"], [0], 1, res, []) == 0  # seed 0 of the tuned and the paper row
    rows = pd.read_csv(os.path.join(res, "table1.csv"))
    assert sorted(rows["recipe"]) == ["paper", "tuned"]
    paper_ari = f"{rows.loc[rows.recipe == 'paper', 'ari'].iloc[0]:.2f}"
    assert benchmark.write_tables(["table1"], [0, 1], res, [], publish=True) == {}  # tuned seed 1 is missing
    assert benchmark.execute(["table1"], [0, 1], 1, res, [], match=["--recipe tuned"]) == 0
    done = benchmark.write_tables(["table1"], [0, 1], res, [], publish=True)
    md, note = done["table1"]
    paper_line = next(line for line in md.splitlines() if "| paper: " in line)
    assert "pending (1 of 2 seeds)" in paper_line and paper_ari not in paper_line
    tuned_line = next(line for line in md.splitlines() if "| tuned: " in line)
    assert " ± " in tuned_line and "pending" not in tuned_line
    assert "Pending: 1 run with `--recipe paper`" in note and os.path.exists(os.path.join(res, "table1.md"))
    monkeypatch.setattr(benchmark, "recipes", lambda: ("paper",))  # no recipes.json: nothing but pending rows
    assert benchmark.write_tables(["table1"], [0, 1], res, [], publish=True) == {}
    assert not os.path.exists(os.path.join(res, "table1.md"))  # the stale table is gone


@pytest.mark.skipif(not os.path.exists(BLADDER), reason="real bladder file not available")
def test_ctrl_c_stops_the_benchmark_and_its_runs(tmp_path):
    res = str(tmp_path / "results")
    env = dict(os.environ, FEDSC_DATA_DIR=REAL, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "benchmark.py", "table3", "--quick", "--jobs", "2", "--results", res],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.isdir(os.path.join(res, "quick", "logs", "table3"))
                                          and len(os.listdir(os.path.join(res, "quick", "logs", "table3"))) == 2):
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 130 and "interrupted: 0 of 4 table3 runs finished" in out, out
    assert "2 stopped, 2 not started" in out
    left = subprocess.run(["pgrep", "-f", res], capture_output=True, text=True).stdout.split()
    assert left == [] and not os.path.exists(os.path.join(res, "quick", "table3.csv"))


def test_speed_first_layer_variants_compute_the_same_product():
    """speed.py times the masked first layer three ways; it refuses to time a variant whose
    product differs from the dense one."""
    speed = importlib.import_module("speed")
    ms = speed.first_layer_variants(30, batch=16, seconds=0.01)
    assert set(ms) == {"dense", "embedding bag over kept genes", "CSR sparse product"} and min(ms.values()) > 0


def test_publish_writes_the_results_file_and_only_its_readme_block(tmp_path, monkeypatch):
    benchmark = importlib.import_module("benchmark")
    (tmp_path / "README.md").write_text("intro\n<!-- x:start -->\nold\n<!-- x:end -->\nmid\n<!-- y:start -->\nkeep\n<!-- y:end -->\n")
    monkeypatch.setattr(benchmark, "ROOT", str(tmp_path))
    benchmark.publish("x", "| new |", "a test", readme="| new | (short) |")
    text = (tmp_path / "README.md").read_text()
    assert "old" not in text and "| new | (short) |" in text and "keep" in text and text.startswith("intro\n")
    assert "written by a test" in text
    assert (tmp_path / "results" / "x.md").read_text() == "| new |\n"


def test_split_reuses_table1_runs_and_its_gaps_are_the_differences(synth, tmp_path, monkeypatch, capsys):
    """The split experiment runs only the IID and one-client runs: its non-IID column is Table 1's
    tuned run (same arguments, data and code), and its gap columns are differences of its ARI cells."""
    import benchmark
    res = str(tmp_path / "results")
    one_method_benchmark(benchmark, monkeypatch, synth)
    assert benchmark.execute(["table1"], [0], 1, res, [], match=["--recipe tuned"]) == 0
    capsys.readouterr()
    assert benchmark.execute(["split"], [0], 2, res, []) == 0
    assert "split: 2 runs to do, 1 already have a row" in capsys.readouterr().out
    t1, sp_ = pd.read_csv(os.path.join(res, "table1.csv")), pd.read_csv(os.path.join(res, "split.csv"))
    assert len(t1) == 1 and len(sp_) == 2 and sorted(sp_["clients"]) == [1, 2]
    assert (sp_["partition"] == "iid").all() and t1["partition"].iloc[0] == "class"
    done = benchmark.write_tables(["split"], [0], res, [], publish=True)
    line = next(l for l in done["split"][0].splitlines() if l.startswith("| FedSimCLR"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    non_iid, iid = t1["ari"].iloc[0], sp_.loc[sp_.clients == 2, "ari"].iloc[0]
    one = sp_.loc[sp_.clients == 1, "ari"].iloc[0]
    assert cells[2:5] == [f"{non_iid:.2f}", f"{iid:.2f}", f"{one:.2f}"]
    assert cells[5:7] == [f"{one - iid:+.2f}", f"{iid - non_iid:+.2f}"]
    assert os.path.exists(os.path.join(res, "split.md"))
