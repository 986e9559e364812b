"""--anchor: the targets are the pooled PCA of every site's cells (from sums only), the head is
averaged like the encoder, training brings the head below the trivial error, the default run is
unchanged, and what crosses to the server is only sums, weights and counts."""
import importlib

import numpy as np
import pytest
import torch

import common
import data as D
from helpers import parse


def _data(n_cells=90, n_genes=30):
    X, y = D.synthetic_counts(n_cells=n_cells, n_genes=n_genes, n_types=3, seed=1)
    parts = [np.arange(0, 25), np.arange(25, 70), np.arange(70, n_cells)]  # uneven sites
    return D.Data(D.preprocess(X, n_genes)[0], y, parts, 3, np.arange(n_cells))


def test_targets_are_the_pooled_pca_scaled_to_unit_mean_square():
    data = _data()
    targets = common.anchor_targets([data.X[idx] for idx in data.parts])
    t = torch.cat(targets).double().numpy()
    Xc = data.X[np.concatenate(data.parts)].astype(np.float64)
    Xc = Xc - Xc.mean(0)
    u, s, vt = np.linalg.svd(Xc, full_matrices=False)
    k = min(common.ANCHOR_DIMS, Xc.shape[1])
    ref = Xc @ vt[:k].T
    ref = ref / np.sqrt((ref ** 2).sum(1).mean())
    assert t.shape == ref.shape
    flip = np.sign((t * ref).sum(0))
    np.testing.assert_allclose(t, ref * flip, atol=1e-4)
    assert abs((t ** 2).sum(1).mean() - 1) < 1e-4


@pytest.mark.parametrize("name", ["fedsc", "fedsimclr", "fedmoco"])
def test_anchor_head_learns_and_is_fedavg_of_the_clients(name):
    """After training the global head predicts the cells' PCA coordinates with an error below 1 (the
    error of predicting 0), and it is the cell-weighted mean of the heads the clients uploaded."""
    mod, data = importlib.import_module(name), _data()
    args = parse(name, ["--rounds", "6", "--local-epochs", "3", "--batch-size", "16", "--lr", "0.3", "--anchor", "1"]
                 + (["--queue-size", "32"] if name == "fedmoco" else []))
    torch.manual_seed(0)
    model = mod.make_model(data.X.shape[1], args)
    seen = []
    aggregate = lambda uploads: (seen.append(uploads), mod.aggregate(uploads))[1]
    common.federate(args, data, model, mod.download, mod.local_update, mod.upload, aggregate)
    last = seen[-1]
    expected = common.fedavg([s["anchor"] for s, _ in last], [n for _, n in last])
    for k, v in model["anchor"].state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    assert [n for _, n in last] == [25, 45, 20]
    targets = common.anchor_targets([data.X[idx] for idx in data.parts])
    with torch.no_grad():  # BatchNorm on the batch's statistics, as in training
        err = np.mean([common.anchor_loss(model, torch.from_numpy(data.X[idx]), t).item()
                       for idx, t in zip(data.parts, targets)])
    assert err < 0.8, f"the anchor head did not learn: error {err:.3f} (1 = predicting 0)"


def test_anchor_off_is_the_default_and_changes_the_run_when_on():
    mod, data = importlib.import_module("fedbyol"), _data()
    out = []
    for extra in ([], ["--anchor", "0"], ["--anchor", "0.5"]):
        args = parse("fedbyol", ["--rounds", "2", "--local-epochs", "1", "--batch-size", "16"] + extra)
        torch.manual_seed(0)
        model = mod.make_model(data.X.shape[1], args)
        common.federate(args, data, model, mod.download, mod.local_update, mod.upload, mod.aggregate)
        out.append(torch.cat([p.detach().flatten() for p in model["online"].parameters()]))
        assert ("anchor" in model) == bool(extra and extra[1] != "0")
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], out[2])
