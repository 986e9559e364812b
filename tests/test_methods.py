"""The methods: their options and the masking augmentation, the lr/tau/EMA schedules and FedSC's
download rule (mu, merge), the losses against naive loops, stop-gradients, MoCo's queue, and a
learning test per method (a broken loss must not learn)."""
import copy
import importlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import data as D
from helpers import TINY, parse, rows, run


# ---------------------------------------------------------------------------------------------
# Options, masking
# ---------------------------------------------------------------------------------------------
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


def test_mask_rate_and_scaling():
    x = torch.ones(400, 500)
    g = torch.Generator().manual_seed(0)
    for p in (0.5, 0.9):
        for v in common.two_views(x, p, g):
            assert abs((v == 0).float().mean().item() - p) < 0.01
            assert torch.allclose(v[v != 0], torch.tensor(1 / (1 - p)))
    a, b = common.two_views(x, 0.9, g)
    assert not torch.equal(a, b) and abs(((a == 0) & (b == 0)).float().mean().item() - 0.81) < 0.01  # independent


# ---------------------------------------------------------------------------------------------
# Schedules, FedSC's download rule
# ---------------------------------------------------------------------------------------------
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



def test_one_pass_normalises_both_views_together_and_nothing_else_changes():
    """--one-pass: each network sees the 2B stacked cells once, so BatchNorm's batch is both views;
    the loss is the same function of those outputs (and the default keeps each view's batch apart)."""
    fedbyol, args, c = _client("fedbyol")
    m, v1, v2 = c.model, torch.randn(16, 20), torch.randn(16, 20) + 1  # views with other means: BN can tell
    one = copy.copy(args)
    one.one_pass = True
    p, z = m["predictor"](m["online"](torch.cat([v1, v2]))), m["target"](torch.cat([v1, v2]))
    naive = (fedbyol.byol_loss(p[:16], z[16:]) + fedbyol.byol_loss(p[16:], z[:16])).mean()
    assert fedbyol.loss_fn(m, v1, v2, one).item() == pytest.approx(naive.item(), rel=1e-6)
    assert fedbyol.loss_fn(m, v1, v2, args).item() != pytest.approx(naive.item(), rel=1e-3)
    with pytest.raises(D.DataError, match="--one-pass is not offered for MoCo"):
        parse("fedmoco", ["--one-pass"])

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
# Learning
# ---------------------------------------------------------------------------------------------
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
