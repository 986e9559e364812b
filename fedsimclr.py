# FedSimCLR (FedSC paper Table 1 baseline). Docs: docs/protocol.md#fedsimclrpy
"""FedSimCLR: each client trains SimCLR locally (encoder g(f(x)), NT-Xent over 2B views with 2B-2
negatives per anchor), uploads its encoder, the server averages the encoders (FedAvg), and each
client replaces its encoder with the global one."""
import common  # first, before any other import: a Ctrl-C from here on ends with one line (cli.py)
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Args(common.FedArgs):
    """FedSimCLR on scRNA-seq counts; defaults are the paper's protocol (docs/protocol.md)."""
    # METHOD: SimCLR local training
    temperature: float = 0.07
    """NT-Xent temperature (EasyFL and contrastive-sc 0.07; SimCLR on CIFAR 0.5)"""
    method: str = dataclasses.field(default="FedSimCLR", init=False)

    def __post_init__(self):
        common.check(self.temperature > 0, f"--temperature must be positive, got {self.temperature}")


# ---------------------------------------------------------------------------------------------
# METHOD: networks. Encoder g(f(x)) only
# ---------------------------------------------------------------------------------------------
def make_model(n_genes, args):
    online = common.Encoder(common.backbone(n_genes), nn.Linear(common.EMBED_DIM, common.PROJ_DIM))
    return nn.ModuleDict(dict(online=online))


# ---------------------------------------------------------------------------------------------
# METHOD: loss. NT-Xent: for each of the 2B views, one positive (its other view), 2B-2 negatives
# ---------------------------------------------------------------------------------------------
def nt_xent(z1, z2, temperature):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])  # view i <-> view i + B
    return F.cross_entropy(sim, positive)


def loss_fn(model, v1, v2, args):
    return nt_xent(*common.views(model["online"], v1, v2, args), args.temperature)


# ---------------------------------------------------------------------------------------------
# CLIENT: local update. A fresh SGD each round (EasyFL), E epochs of shuffled batches, two masked
# views of every batch, one step per batch
# ---------------------------------------------------------------------------------------------
def local_update(client, lr, args):
    model, gen = client.model, client.gen
    params = list(model["online"].parameters())  # METHOD: what the optimizer updates
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
UPLOAD = ("online",)  # everything the client has


def upload(client):
    """CLIENT -> SERVER: copies of the UPLOAD modules' weights and the client's cell count."""
    return {key: common.weights(client.model[key]) for key in UPLOAD}, client.n


def aggregate(uploads):
    """SERVER: FedAvg of each uploaded module, weighted by the clients' cell counts."""
    states, counts = zip(*uploads)
    return {key: common.fedavg([s[key] for s in states], counts) for key in UPLOAD}


def download(client, global_state, args):
    """SERVER -> CLIENT: the encoder <- the global one."""
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
