"""Tests: every script end to end as a subprocess with tiny settings, and reference checks of the
pieces that decide the results (FedAvg, FedSC's mu and merge, losses, partition, HVGs, masking).
Run: python -m pytest -q test_smoke.py   (real-data tests read $FEDSC_DATA_DIR, default ./data)"""
import copy
import importlib
import os
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import common
import data as D

ROOT = os.path.dirname(os.path.abspath(__file__))
REAL = os.environ.get("FEDSC_DATA_DIR", os.path.join(ROOT, "data"))
BLADDER = os.path.join(REAL, "mouse_bladder_cell_top2000.h5")
TINY = ["--rounds", "2", "--local-epochs", "1", "--batch-size", "64", "--n-genes", "100"]
SCRIPTS = [("fedsc.py", []), ("fedbyol.py", []), ("fedsimclr.py", []), ("fedmoco.py", ["--version", "1"]),
           ("fedmoco.py", ["--version", "2"]), ("fedsimsiam.py", [])]


def run(args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, env=e, timeout=600)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    X, y = D.synthetic_counts(n_cells=300, n_genes=200, n_types=4, seed=0)
    path = tmp_path_factory.mktemp("data") / "synth.h5"
    with h5py.File(path, "w") as f:
        f["X"], f["Y"] = X, y + 1
    return str(path)


def rows(csv):
    return pd.read_csv(csv) if os.path.exists(csv) else pd.DataFrame()


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
    assert len(r) == 1 and 0 <= r["ari"][0] <= 100 and r["rounds"][0] == 2
    run_dir = os.path.join(tmp_path, "runs", r["run"][0])
    assert np.load(os.path.join(run_dir, "embedding.npy")).shape == (300, 60)
    assert len(pd.read_csv(os.path.join(run_dir, "clusters.csv"))) == 300


@pytest.mark.skipif(not os.path.exists(BLADDER), reason="real bladder file not available")
def test_fedsc_on_real_bladder(tmp_path):
    out = str(tmp_path / "r.csv")
    p = run(["fedsc.py", "--data", "mouse_bladder", "--rounds", "2", "--local-epochs", "1", "--out", out],
            env={"FEDSC_DATA_DIR": REAL})
    assert p.returncode == 0, p.stderr
    assert "2746 cells x 1500 genes, 16 types" in p.stdout
    r = rows(out)
    assert r["ari"][0] > 1 and r["types_per_client"][0] == 4 and r["n_genes"][0] == 1500
    assert "mu 0.700" in p.stdout  # round 2 is every client's first EMA download: mu = alpha


@pytest.mark.parametrize("baseline", ["pca", "pca_raw", "csc"])
def test_centralized_baselines(baseline, synth, tmp_path):
    out = str(tmp_path / "r.csv")
    p = run(["centralized.py", "--data", synth, "--baseline", baseline, "--epochs", "2", "--n-genes", "100",
             "--out", out])
    assert p.returncode == 0, p.stderr
    assert rows(out)["method"][0] in ("PCA", "PCA-raw (paper)", "contrastive-sc")


def test_same_seed_same_metrics_other_seed_differs(synth, tmp_path):
    out = str(tmp_path / "r.csv")
    for seed in ("3", "3", "4"):
        assert run(["fedsc.py", "--data", synth, "--clients", "2", "--seed", seed, "--out", out] + TINY).returncode == 0
    r = rows(out)
    assert r.loc[0, ["ari", "nmi", "sil", "ch"]].tolist() == r.loc[1, ["ari", "nmi", "sil", "ch"]].tolist()
    assert r.loc[0, "ch"] != r.loc[2, "ch"]
    assert r.loc[0, "config_id"] == r.loc[1, "config_id"] != r.loc[2, "config_id"]


def test_eval_every_does_not_change_the_run(synth, tmp_path):
    """Evaluating the global model during training must not touch the clients or the RNG."""
    out = str(tmp_path / "r.csv")
    for extra in ([], ["--eval-every", "1"]):
        p = run(["fedsc.py", "--data", synth, "--clients", "2", "--rounds", "3", "--out", out] + TINY[2:] + extra)
        assert p.returncode == 0, p.stderr
    assert "ARI" in p.stdout.split("round 1/3")[1].splitlines()[0]
    r = rows(out)
    assert r.loc[0, ["ari", "nmi", "sil", "ch"]].tolist() == r.loc[1, ["ari", "nmi", "sil", "ch"]].tolist()


def test_unlabelled_data_reports_label_free_metrics(tmp_path):
    X, _ = D.synthetic_counts(n_cells=200, n_genes=150, seed=1)
    path = tmp_path / "counts.csv"
    pd.DataFrame(X.T, index=[f"g{i}" for i in range(150)]).to_csv(path)  # genes x cells, as R writes
    out = str(tmp_path / "r.csv")
    p = run(["fedsc.py", "--data", str(path), "--transpose", "--partition", "iid", "--n-clusters", "3",
             "--clients", "2", "--out", out] + TINY)
    assert p.returncode == 0, p.stderr
    r = rows(out)
    assert "ari" not in r.columns and np.isfinite(r["sil"][0])


# ---------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no traceback, no results row
# ---------------------------------------------------------------------------------------------
def _bad_files(tmp):
    X, y = D.synthetic_counts(n_cells=50, n_genes=40, n_types=4, seed=0)
    files = {}
    for name, Xb, yb in [("neg", -X, y), ("nan", np.where(X > 3, np.nan, X), y), ("short", X, y[:-5])]:
        files[name] = str(tmp / f"{name}.h5")
        with h5py.File(files[name], "w") as f:
            f["X"], f["Y"] = Xb, yb
    files["nocounts"] = str(tmp / "nocounts.h5")
    with h5py.File(files["nocounts"], "w") as f:
        f["Y"] = y
    files["junk"] = str(tmp / "junk.h5")
    open(files["junk"], "w").write("not hdf5")
    files["tiny"] = str(tmp / "tiny.h5")
    with h5py.File(files["tiny"], "w") as f:
        f["X"], f["Y"] = X[:3], y[:3]
    return files


@pytest.mark.parametrize("case,args,expect", [
    ("missing", ["--data", "/nonexistent/file.h5"], "does not exist"),
    ("unknown name", ["--data", "PBMC_68k"], "unknown dataset name"),
    ("junk", ["--data", "{junk}"], "neither HDF5"),
    ("no counts", ["--data", "{nocounts}"], "holds no counts"),
    ("negative", ["--data", "{neg}"], "negative"),
    ("nan", ["--data", "{nan}"], "NaN"),
    ("label length", ["--data", "{short}"], "45 labels for 50 cells"),
    ("fewer cells than clients", ["--data", "{tiny}", "--clients", "8", "--partition", "iid"], "3 cells for 8 clients"),
    ("too many types", ["--data", "{neg}", "--types-per-client", "9"], "is more than the 4"),
    ("client with one cell", ["--data", "{tiny}", "--clients", "3", "--partition", "iid", "--n-genes", "10"],
     "every client needs at least 2"),
])
def test_bad_input(case, args, expect, tmp_path):
    files = _bad_files(tmp_path)
    args = [a.format(**files) for a in args]
    if case == "too many types":  # a valid file, an impossible partition
        X, y = D.synthetic_counts(n_cells=50, n_genes=40, n_types=4, seed=0)
        args[1] = str(tmp_path / "ok.h5")
        with h5py.File(args[1], "w") as f:
            f["X"], f["Y"] = X, y
    out = str(tmp_path / "r.csv")
    p = run(["fedsc.py", "--out", out, "--rounds", "1"] + args, env={"FEDSC_DATA_DIR": str(tmp_path)})
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert expect in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: ")
    assert not os.path.exists(out)


def test_cli_flags_parse():
    fedbyol, fedmoco = importlib.import_module("fedbyol"), importlib.import_module("fedmoco")
    a = common.parse_args(fedbyol.Args, ["--no-ema", "--no_sg", "--local-epochs", "7", "--no-l2norm"])
    assert a.no_ema and a.no_sg and not a.no_predictor and a.local_epochs == 7 and not a.l2norm
    assert not common.parse_args(fedmoco.Args, ["--no-symmetric"]).symmetric
    assert common.parse_args(fedmoco.Args, ["--version", "2"]).version == 2
    with pytest.raises(SystemExit):
        common.parse_args(fedmoco.Args, ["--version", "3"])


# ---------------------------------------------------------------------------------------------
# Download path (no network in tests: a closed local port, and file:// URLs)
# ---------------------------------------------------------------------------------------------
def test_download_failure_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSC_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(D, "SCDCC", "http://127.0.0.1:9/")
    with pytest.raises(D.DataError, match=f"put the file at {tmp_path}"):
        D.resolve_data("10X_PBMC")
    assert os.listdir(tmp_path) == []  # nothing half-written


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
def test_h5ad_reader_dense_and_csr_with_categorical_obs(tmp_path):
    import scipy.sparse as sp
    X, y = D.synthetic_counts(n_cells=60, n_genes=30, seed=2)
    names = np.array(["B", "NK", "T", "mono"])
    for layout in ("dense", "csr"):
        path = str(tmp_path / f"{layout}.h5ad")
        with h5py.File(path, "w") as f:
            if layout == "dense":
                f["X"] = X
            else:
                m = sp.csr_matrix(X)
                g = f.create_group("X")
                g.attrs["encoding-type"], g.attrs["shape"] = "csr_matrix", X.shape
                g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
            obs = f.create_group("obs")
            obs.create_group("cell_type")
            obs["cell_type"]["codes"] = y.astype(np.int8)
            obs["cell_type"]["categories"] = names.astype("S")
            obs["plain"] = names[y].astype("S")
        Xr, yr = D.read_counts(path, label_key="cell_type")
        Xr = Xr.toarray() if sp.issparse(Xr) else Xr
        assert np.array_equal(Xr, X) and np.array_equal(yr, y)
        assert np.array_equal(D.read_counts(path, label_key="plain")[1], y)
        with pytest.raises(D.DataError, match="no column 'donor'"):
            D.read_counts(path, label_key="donor")


def test_csv_reader_with_labels_file(tmp_path):
    X, y = D.synthetic_counts(n_cells=40, n_genes=20, seed=3)
    pd.DataFrame(X).to_csv(tmp_path / "c.csv")
    pd.Series(np.array(["a", "b", "c", "d"])[y], name="label").to_csv(tmp_path / "l.csv", index=False)
    Xr, yr = D.read_counts(str(tmp_path / "c.csv"), labels=str(tmp_path / "l.csv"))
    assert np.allclose(Xr, X) and np.array_equal(yr, np.unique(y, return_inverse=True)[1])


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


def test_mask_rate_and_scaling():
    x = torch.ones(400, 500)
    g = torch.Generator().manual_seed(0)
    for p in (0.5, 0.9):
        v = common.mask(x, p, g)
        assert abs((v == 0).float().mean().item() - p) < 0.01
        assert torch.allclose(v[v != 0], torch.tensor(1 / (1 - p)))
    a, b = common.mask(x, 0.9, g), common.mask(x, 0.9, g)
    assert not torch.equal(a, b)  # two views get independent masks


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
# Aggregation and FedSC's download rule
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


def test_fedsc_mu_rule_and_ema_merge():
    fedsc = importlib.import_module("fedsc")
    args = common.parse_args(fedsc.Args, [])
    state = {}
    assert fedsc.decay_rate(2.0, state, args) == pytest.approx(0.7)  # first EMA: mu = alpha
    assert state["lam"] == pytest.approx(0.35)
    assert fedsc.decay_rate(1.0, state, args) == pytest.approx(0.35)  # lambda frozen: mu = lambda d
    assert fedsc.decay_rate(5.0, state, args) == 1.0  # capped at 1
    lit = common.parse_args(fedsc.Args, ["--mu-rule", "literal"])
    assert fedsc.decay_rate(2.0, {}, lit) == pytest.approx(0.35) and fedsc.decay_rate(0.5, {}, lit) == 1.0
    local = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    glob = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    merged = fedsc.ema_merge(local, glob, 0.25)
    assert torch.allclose(merged["w"], 0.25 * local["w"] + 0.75 * glob["w"])
    a, b = common.backbone(6), common.backbone(6)
    flat = torch.cat([(a.state_dict()[k] - p).flatten() for k, p in b.named_parameters()])
    assert fedsc.divergence(a.state_dict(), b) == pytest.approx(flat.norm().item(), rel=1e-5)


def test_fedsc_download_round0_then_merge():
    fedsc = importlib.import_module("fedsc")
    args = common.parse_args(fedsc.Args, [])
    torch.manual_seed(0)
    model = fedsc.make_model(20, args)
    client = common.Client(0, torch.randn(10, 20), copy.deepcopy(model), {})
    glob = {k: copy.deepcopy(model[k].state_dict()) for k in fedsc.UPLOAD}
    assert fedsc.download(client, glob, 0, args) == {}
    with torch.no_grad():
        for p in client.model["online"].parameters():
            p.add_(0.1)  # pretend local training moved the weights
    before = copy.deepcopy(client.model["online"].state_dict())
    log = fedsc.download(client, glob, 1, args)
    assert log["mu"] == pytest.approx(0.7)
    after = client.model["online"].state_dict()
    for k in before:
        if before[k].is_floating_point():
            assert torch.allclose(after[k], 0.7 * before[k] + 0.3 * glob["online"][k], atol=1e-6)
    target = client.model["target"].state_dict()  # the target is local: untouched by the merge
    assert all(torch.equal(target[k], glob["online"][k]) for k in target)


def test_fedsc_ema_target_update():
    fedsc = importlib.import_module("fedsc")
    on, tg = common.backbone(5), common.backbone(5)
    want = {k: 0.99 * p.detach() + 0.01 * dict(on.named_parameters())[k].detach() for k, p in tg.named_parameters()}
    fedsc.ema_(tg, on, 0.99)
    assert all(torch.allclose(p, want[k]) for k, p in tg.named_parameters())


# ---------------------------------------------------------------------------------------------
# Baselines: losses, queue, stop-gradient, what is uploaded
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


def _client(mod, argv=()):
    args = common.parse_args(mod.Args, list(argv))
    args.seed = 0
    torch.manual_seed(0)
    model = mod.make_model(20, args)
    return args, common.Client(0, torch.randn(16, 20), model, {})


@pytest.mark.parametrize("name", ["fedsimsiam", "fedbyol", "fedsc"])
def test_no_gradient_reaches_stop_gradient_branch(name):
    mod = importlib.import_module(name)
    args, c = _client(mod)
    v1, v2 = torch.randn(16, 20), torch.randn(16, 20)
    if name == "fedsimsiam":  # gradient flows only through p = q(z); the z being predicted is detached
        z1, z2 = c.model["online"](v1), c.model["online"](v2)
        z1.retain_grad(), z2.retain_grad()
        p1, p2 = c.model["predictor"](z1), c.model["predictor"](z2)
        loss = -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=-1).mean() + F.cosine_similarity(p2, z1.detach(), dim=-1).mean())
        ref = loss.item()
        assert mod.loss_fn(c.model, v1, v2, c, args).item() == pytest.approx(ref, rel=1e-6)
        # the grad of z only comes via the predictor: zero it and nothing reaches z
        c.model["predictor"].weight.data.zero_()
        c.model["predictor"].bias.data.fill_(1.0)
        for p in c.model.parameters():
            p.grad = None
        mod.loss_fn(c.model, v1, v2, c, args).backward()
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in c.model["online"].parameters())
    else:
        mod.loss_fn(c.model, v1, v2, c, args).backward()
        assert all(p.grad is None for p in c.model["target"].parameters())
        assert all(p.grad is not None for p in c.model["online"].parameters())
    if name == "fedbyol":  # --no-sg: the target does get gradients (and joins the optimizer)
        args, c = _client(mod, ["--no-sg"])
        mod.loss_fn(c.model, v1, v2, c, args).backward()
        assert all(p.grad is not None for p in c.model["target"].parameters())
        n_online = len(list(c.model["online"].parameters()))
        assert len(mod.trainable(c.model, args)) == 2 * n_online + 2  # online + target + predictor W, b


@pytest.mark.parametrize("name,argv,uploaded,local", [
    ("fedsc", [], {"online", "predictor"}, {"target"}),
    ("fedbyol", [], {"online", "predictor"}, {"target"}),
    ("fedsimclr", [], {"online"}, set()),
    ("fedmoco", [], {"online"}, {"key"}),
    ("fedmoco", ["--version", "2"], {"online"}, {"key"}),
    ("fedsimsiam", [], {"online", "predictor"}, set()),
])
def test_what_clients_upload(name, argv, uploaded, local):
    """Run one real round through common.federate and record what reaches the server."""
    mod = importlib.import_module(name)
    args = common.parse_args(mod.Args, list(argv) + ["--rounds", "1", "--local-epochs", "1", "--batch-size", "8"])
    common.resolve(args, name)
    X, y = D.synthetic_counts(n_cells=40, n_genes=20, n_types=2, seed=0)
    data = common.Data(D.preprocess(X, 20)[0], y, [np.arange(20), np.arange(20, 40)], 2, np.arange(40))
    seen = []
    real = common.fedavg
    try:
        common.fedavg = lambda states, counts: (seen.append((states, counts)), real(states, counts))[1]
        torch.manual_seed(0)
        common.federate(args, data, mod.make_model(data.X.shape[1], args), mod.UPLOAD, mod.download,
                        mod.loss_fn, mod.trainable, getattr(mod, "after_step", None))
    finally:
        common.fedavg = real
    assert set(mod.UPLOAD) == uploaded and not (set(mod.UPLOAD) & local)
    assert set(mod.make_model(20, args).keys()) == uploaded | local
    assert len(seen) == len(uploaded) and all(counts == (20, 20) for _, counts in seen)
    sent = {k for states, _ in seen for k in states[0]}
    assert not any("queue" in k for k in sent)  # MoCo's queue lives in client.state, never uploaded


# ---------------------------------------------------------------------------------------------
# Results files and the benchmark driver
# ---------------------------------------------------------------------------------------------
def test_append_row_keeps_every_row(tmp_path):
    path = str(tmp_path / "r.csv")
    common.append_row(path, {"a": 1, "b": 2})
    common.append_row(path, {"a": 3, "c": 4})
    r = pd.read_csv(path)
    assert r["a"].tolist() == [1, 3] and list(r.columns) == ["a", "b", "c"]
    assert os.listdir(tmp_path) == ["r.csv", "r.csv.lock"]


def test_benchmark_resumes_and_builds_tables(synth, tmp_path, monkeypatch):
    import benchmark
    res = str(tmp_path / "results")
    monkeypatch.setattr(benchmark, "plan", lambda exp, seeds: [
        ("FedSC", "fedsc.py", ["--data", synth, "--clients", "2"] + TINY, s) for s in seeds])
    assert benchmark.execute(["table3"], [0, 1], 2, res, []) == 0
    assert len(pd.read_csv(os.path.join(res, "table3.csv"))) == 2
    assert benchmark.execute(["table3"], [0, 1, 2], 2, res, []) == 0  # only seed 2 is new
    r = pd.read_csv(os.path.join(res, "table3.csv"))
    assert sorted(r["seed"]) == [0, 1, 2]
    df = benchmark.all_rows(res)
    got = benchmark.rows_for(df, "fedsc.py", ["--data", synth, "--clients", "2"] + TINY, [0, 1, 2])
    assert len(got) == 3
    cell = benchmark.cell(got, "ari")
    assert cell == f"{got['ari'].mean():.2f} ± {got['ari'].std(ddof=1):.2f}"
