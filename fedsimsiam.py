# FedSimSiam (FedSC paper Table 1 baseline). Docs: docs/protocol.md#fedsimsiampy
"""FedSimSiam: each client trains SimSiam locally (encoder + predictor, stop-gradient, no momentum
encoder), uploads its encoder and predictor, the server averages them (FedAvg), and each client
replaces both with the global ones."""
import common  # first, before any other import: a Ctrl-C from here on ends with one line (cli.py)
import dataclasses
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Args(common.FedArgs):
    """FedSimSiam on scRNA-seq counts; defaults are the paper's protocol (docs/protocol.md)."""
    # METHOD: SimSiam local training
    predictor: typing.Literal["linear", "mlp"] = "linear"
    """predictor q: Linear(128,128) as the paper, or SimSiam's bottleneck Linear-BN-ReLU-Linear 128->32->128"""
    method: str = dataclasses.field(default="FedSimSiam", init=False)


# ---------------------------------------------------------------------------------------------
# METHOD: networks. Encoder g(f(x)) and predictor q; no target network
# ---------------------------------------------------------------------------------------------
def make_model(n_genes, args):
    online = common.Encoder(common.backbone(n_genes), nn.Linear(common.EMBED_DIM, common.PROJ_DIM))
    if args.predictor == "linear":
        predictor = nn.Linear(common.PROJ_DIM, common.PROJ_DIM)
    else:
        predictor = nn.Sequential(nn.Linear(common.PROJ_DIM, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.Linear(32, common.PROJ_DIM))
    return nn.ModuleDict(dict(online=online, predictor=predictor))


# ---------------------------------------------------------------------------------------------
# METHOD: loss. L = -1/2 cos(p1, sg(z2)) - 1/2 cos(p2, sg(z1)), z = g(f(v)), p = q(z)
# ---------------------------------------------------------------------------------------------
def loss_fn(model, v1, v2, args):
    z1, z2 = common.views(model["online"], v1, v2, args)
    p1, p2 = common.views(model["predictor"], z1, z2, args)
    # stop-gradient: the z being predicted is detached, only the predictor branch gets gradients
    return -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=-1).mean()
                   + F.cosine_similarity(p2, z1.detach(), dim=-1).mean())


# ---------------------------------------------------------------------------------------------
# CLIENT: local update. A fresh SGD each round (EasyFL), E epochs of shuffled batches, two masked
# views of every batch, one step per batch
# ---------------------------------------------------------------------------------------------
def local_update(client, lr, args):
    model, gen = client.model, client.gen
    params = list(model["online"].parameters()) + list(model["predictor"].parameters())  # METHOD
    params += list(model["anchor"].parameters()) if args.anchor else []  # --anchor (common.py)
    opt = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay, fused=True)
    model.train()
    losses = []
    for epoch in range(args.local_epochs):
        for idx in common.batches(client.n, args.batch_size, gen):
            x = client.x[idx]
            v1, v2 = common.two_views(x, args.mask_rate, gen)
            loss = loss_fn(model, v1, v2, args)
            if args.anchor:  # --anchor: each cell also regresses its federated-PCA coordinates (common.py)
                loss = loss + args.anchor * common.anchor_loss(model, x, client.state["anchor"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return {"loss": sum(losses) / len(losses)}


# ---------------------------------------------------------------------------------------------
# FEDERATED: what a client uploads, how the server aggregates, how a client takes the result back
# ---------------------------------------------------------------------------------------------
UPLOAD = ("online", "predictor")  # everything the client has


def upload(client):
    """CLIENT -> SERVER: copies of the UPLOAD modules' weights and the client's cell count."""
    return {key: common.weights(client.model[key]) for key in UPLOAD}, client.n


def aggregate(uploads):
    """SERVER: FedAvg of each uploaded module, weighted by the clients' cell counts."""
    states, counts = zip(*uploads)
    return {key: common.fedavg([s[key] for s in states], counts) for key in UPLOAD}


def download(client, global_state, args):
    """SERVER -> CLIENT: the encoder and the predictor <- the global ones."""
    for key in UPLOAD:
        client.model[key].load_state_dict(global_state[key])
    return {}


if __name__ == "__main__":
    with common.user_errors():
        args = common.parse_args(Args)
        data = common.setup(args)
        model = make_model(data.X.shape[1], args)  # the server's initial global model (seeded)
        log = common.federate(args, data, model, download, local_update, upload, aggregate)
        common.finish(args, data, model, log)
