"""The federation: the loop (batches, FedAvg, seeds, evaluation during training, two clients at
once), federated preprocessing and evaluation against their pooled versions (KMeans, scores,
BatchNorm statistics from the sites), and what crosses from the sites to the server."""
import copy
import importlib
import os

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import common
import federated
import data as D
from helpers import REAL, TINY, parse, rows, run, site_files


# ---------------------------------------------------------------------------------------------
# The loop and FedAvg
# ---------------------------------------------------------------------------------------------
def test_batching_rule():
    g = torch.Generator().manual_seed(0)
    assert [len(b) for b in common.batches(300, 128, g)] == [128, 128]  # incomplete last batch dropped
    assert [len(b) for b in common.batches(100, 128, g)] == [100]  # no full batch: one batch of all
    assert common.batches(1, 128, g) == []  # BatchNorm needs two cells


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


def test_same_seed_same_metrics_other_seed_differs(synth, tmp_path):
    out = str(tmp_path / "r.csv")
    for seed in ("3", "3", "4"):
        assert run(["fedsc.py", "--data", synth, "--clients", "2", "--seed", seed, "--out", out] + TINY).returncode == 0
    r = rows(out)
    assert r.loc[0, ["ari", "nmi", "sil", "ch"]].tolist() == r.loc[1, ["ari", "nmi", "sil", "ch"]].tolist()
    assert r.loc[0, "ch"] != r.loc[2, "ch"]
    assert r.loc[0, "config_id"] == r.loc[1, "config_id"] != r.loc[2, "config_id"]
    assert r.loc[0, "run"] != r.loc[1, "run"]  # two runs never share a folder


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


def _tiny_data(n_cells=60, n_genes=20):
    X, y = D.synthetic_counts(n_cells=n_cells, n_genes=n_genes, n_types=2, seed=0)
    half = n_cells // 2
    return D.Data(D.preprocess(X, n_genes)[0], y, [np.arange(half), np.arange(half, n_cells)], 2, np.arange(n_cells))


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


# ---------------------------------------------------------------------------------------------
# Federated preprocessing and evaluation
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# What crosses from the sites to the server
# ---------------------------------------------------------------------------------------------
def test_server_receives_no_array_with_a_row_per_cell(tmp_path, monkeypatch):
    """A whole federated run (--sites: per-site preprocessing, training, federated evaluation) with
    every SITE -> SERVER crossing spied on: what the site functions return to the server (gene
    moments, counts below a threshold, uploads, per-cluster sums, contingency and scatter tables)
    and what the server functions receive. None of it may have a dimension of a site's cell count
    (70 and 90 here, which no gene, cluster or layer count equals)."""
    fedsc = importlib.import_module("fedsc")
    a, b, _, _ = site_files(tmp_path)
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
    SITE.add("site_sums")  # --anchor: the federated PCA's sums (fedpca.py)
    spy(importlib.import_module("fedpca"), "site_sums")
    ask = federated.LocalSites.ask
    def spied_ask(self, action, **payload):  # and every reply of every site to every question of the server
        replies = ask(self, action, **payload)
        check("replies", replies)
        return replies
    monkeypatch.setattr(federated.LocalSites, "ask", spied_ask)
    upload = lambda client: (lambda out: (check("upload", out), out)[1])(fedsc.upload(client))
    keys = set()  # the modules that reach the server: fedsc's UPLOAD and, with --anchor, the head
    aggregate = lambda uploads: (check("aggregate args", uploads), keys.update(uploads[0][0]), fedsc.aggregate(uploads))[2]

    args = parse("fedsc", ["--sites", a, b, "--evaluate", "federated", "--bn-stats", "recompute",
                           "--anchor", "1", "--out", str(tmp_path / "r.csv")] + TINY)
    data = common.setup(args)
    model = fedsc.make_model(data.X.shape[1], args)
    log = common.federate(args, data, model, fedsc.download, fedsc.local_update, upload, aggregate)
    metrics = common.finish(args, data, model, log)
    assert np.isfinite(metrics["ari"]) and np.isfinite(metrics["sil_simplified"])
    for where in ("replies", "site_moments output", "merge_moments args", "site_count output", "upload", "aggregate args",
                  "site_assign output", "site_contingency output", "scores_from_contingency args",
                  "site_scatter output", "merge_scatter args", "site_bn_moments output", "merge_bn_moments args",
                  "site_sums output"):
        assert where in seen, f"the spy on {where} saw nothing"
    assert keys == {"online", "predictor", "anchor"}
    # and the check bites: a site's labels (one per cell) would be caught
    h = np.random.default_rng(0).normal(size=(70, 5))
    with pytest.raises(AssertionError, match="shape"):
        check("labels", federated.site_assign(h, h[:4])[0])
    monkeypatch.setattr(federated, "site_clusters", lambda state, **payload: {"labels": state["h"][:, 0]})
    with pytest.raises(AssertionError, match="shape"):  # a site step that sends its cells' labels is caught
        federated.LocalSites([{"h": h}]).ask("clusters")


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
