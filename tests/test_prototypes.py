"""--prototypes: sites send equal-size centroids of their cells' projections, the server clusters
them into shared prototypes, and each local loss adds a swapped prediction over those prototypes.
The clustering makes equal-size groups, the loss equals a naive per-cell loop, the prototypes join
after --proto-warmup rounds, and the default run is unchanged."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import data as D
from helpers import parse


def _data(n_cells=90, n_genes=30):
    X, y = D.synthetic_counts(n_cells=n_cells, n_genes=n_genes, n_types=3, seed=1)
    parts = [np.arange(0, 25), np.arange(25, 70), np.arange(70, n_cells)]
    return D.Data(D.preprocess(X, n_genes)[0], y, parts, 3, np.arange(n_cells))


def test_sinkhorn_kmeans_makes_equal_size_groups_of_unequal_data():
    """300 points around one direction and 20 around another: plain nearest-centroid k-means keeps
    the 300 / 20 split; the Sinkhorn assignment cuts the large group so both centroids get ~half."""
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(300, 16, generator=g) * 0.1 + torch.eye(16)[0], dim=1)
    b = F.normalize(torch.randn(20, 16, generator=g) * 0.1 + torch.eye(16)[1], dim=1)
    z = torch.cat([a, b])
    c = common.sinkhorn_kmeans(z, 2, torch.Generator().manual_seed(1))
    assert torch.allclose(c.norm(dim=1), torch.ones(2))
    sizes = torch.bincount(common.sinkhorn(z @ c.T).argmax(1), minlength=2)
    assert sizes.min() >= 100, f"groups of {sizes.tolist()}"
    plain = torch.bincount((z @ torch.stack([a.mean(0), b.mean(0)]).T).argmax(1), minlength=2)
    assert plain.tolist() == [300, 20]  # what the data alone would give


def test_proto_loss_equals_a_per_cell_loop():
    data, mod = _data(), importlib.import_module("fedbyol")
    args = parse("fedbyol", ["--rounds", "1"])
    torch.manual_seed(0)
    model = mod.make_model(data.X.shape[1], args)
    protos = F.normalize(torch.randn(5, common.PROJ_DIM), dim=1)
    x = torch.from_numpy(data.X[:16])
    v1, v2 = common.two_views(x, 0.5, torch.Generator().manual_seed(0))
    model.eval()  # the same BatchNorm output for a batch and for one cell
    got = common.proto_loss(model, v1, v2, protos)
    total = 0.0
    for i in range(16):
        for a, b in ((v1, v2), (v2, v1)):  # teacher on one view, online on the other
            zt = F.normalize(model["target"](a[i:i + 1]), dim=1)[0]
            zo = F.normalize(model["online"](b[i:i + 1]), dim=1)[0]
            q = torch.exp(zt @ protos.T / 0.05) / torch.exp(zt @ protos.T / 0.05).sum()
            logp = zo @ protos.T / 0.1 - torch.log(torch.exp(zo @ protos.T / 0.1).sum())
            total += -(q * logp).sum().item() / 16 / 2
    assert got.item() == pytest.approx(total, rel=1e-4)


@pytest.mark.parametrize("name", ["fedsc", "fedsimclr", "fedmoco"])
def test_prototypes_join_after_the_warmup_and_come_from_the_sites_centroids(name):
    mod, data = importlib.import_module(name), _data()
    args = parse(name, ["--rounds", "4", "--local-epochs", "1", "--batch-size", "16", "--prototypes", "1",
                        "--proto-local", "4", "--proto-global", "6", "--proto-warmup", "2"]
                 + (["--queue-size", "32"] if name == "fedmoco" else []))
    torch.manual_seed(0)
    model = mod.make_model(data.X.shape[1], args)
    used, sent = [], []
    def local_update(client, lr, args):
        p = client.state["protos"]
        used.append(None if p is None else p.clone())
        return mod.local_update(client, lr, args)
    aggregate = lambda uploads: (sent.append([s["centroids"] for s, _ in uploads]), mod.aggregate(uploads))[1]
    common.federate(args, data, model, mod.download, local_update, mod.upload, aggregate)
    assert [p is None for p in used] == [True] * 6 + [False] * 6  # 3 clients: rounds 1-2 without, 3-4 with
    assert all(c.shape == (4, common.PROJ_DIM) for r in sent for c in r)  # 4 centroids per site, never cells
    expected = common.server_prototypes(sent[2 - 1], 6, args.seed + 1)  # made after round 2, used in round 3
    torch.testing.assert_close(used[6], expected, rtol=0, atol=0)
    assert used[6].shape == (6, common.PROJ_DIM)


def test_prototypes_off_is_the_default_and_change_the_run_when_on():
    mod, data = importlib.import_module("fedbyol"), _data()
    out = []
    for extra in ([], ["--prototypes", "0"], ["--prototypes", "1"]):
        args = parse("fedbyol", ["--rounds", "3", "--local-epochs", "1", "--batch-size", "16"] + extra)
        torch.manual_seed(0)
        model = mod.make_model(data.X.shape[1], args)
        common.federate(args, data, model, mod.download, mod.local_update, mod.upload, mod.aggregate)
        out.append(torch.cat([p.detach().flatten() for p in model["online"].parameters()]))
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], out[2])
