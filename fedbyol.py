# FedBYOL (the FedU / FedEMA papers' baseline; FedSC paper Tables 1-2). Docs: docs/protocol.md#fedbyolpy
"""FedBYOL: each client trains BYOL locally (online encoder + predictor, EMA target, stop-gradient),
uploads its online encoder and predictor, the server averages them (FedAvg), and each client
replaces both with the global ones; the target encoder stays on the client. Flags remove the
predictor, the EMA or the stop-gradient (the paper's Table 2 ablation)."""
import common  # first, before any other import: a Ctrl-C from here on ends with one line (cli.py)
import copy
import dataclasses
import math
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Args(common.FedArgs):
    """FedBYOL on scRNA-seq counts; defaults are the paper's protocol (docs/protocol.md)."""
    # METHOD: BYOL local training
    tau: float = 0.99
    """EMA rate of the local target encoder, applied after every step (EasyFL 0.99)"""
    tau_schedule: typing.Literal["constant", "cosine"] = "constant"
    """constant tau, or BYOL's cosine increase from tau to 1 over the client's steps"""
    predictor: typing.Literal["linear", "mlp"] = "linear"
    """predictor q: Linear(128,128) as the paper, or Linear-BN-ReLU-Linear with 512 hidden"""
    # METHOD: Table 2 ablation
    no_predictor: bool = False
    """remove the predictor: q = identity"""
    no_ema: bool = False
    """remove the EMA target: the target branch is the online encoder itself (tau = 0)"""
    no_sg: bool = False
    """remove the stop-gradient: the target branch gets gradients too; with the EMA target kept, its
    parameters join the optimizer and also get the EMA blend after each step (docs/protocol.md: deviation 9)"""
    method: str = dataclasses.field(default="FedBYOL", init=False)

    def __post_init__(self):
        common.check(0 <= self.tau <= 1, f"--tau must be in [0, 1], got {self.tau}")


# ---------------------------------------------------------------------------------------------
# METHOD: networks. Online encoder g(f(x)), predictor q, target = EMA copy of the online encoder
# ---------------------------------------------------------------------------------------------
def make_model(n_genes, args):
    online = common.Encoder(common.backbone(n_genes), nn.Linear(common.EMBED_DIM, common.PROJ_DIM))
    if args.no_predictor:
        predictor = nn.Identity()
    elif args.predictor == "linear":
        predictor = nn.Linear(common.PROJ_DIM, common.PROJ_DIM)
    else:
        predictor = nn.Sequential(nn.Linear(common.PROJ_DIM, 512), nn.BatchNorm1d(512), nn.ReLU(),
                                  nn.Linear(512, common.PROJ_DIM))
    target = copy.deepcopy(online).requires_grad_(args.no_sg and not args.no_ema)
    return nn.ModuleDict(dict(online=online, predictor=predictor, target=target))


# ---------------------------------------------------------------------------------------------
# METHOD: loss. Symmetric BYOL, 2 - 2 cos(q(g(f(v1))), sg(target(v2))) + the swapped pair (Eq. 2)
# ---------------------------------------------------------------------------------------------
def byol_loss(p, z):
    return 2 - 2 * F.cosine_similarity(p, z, dim=-1)


def loss_fn(model, v1, v2, args):
    p1, p2 = common.views(lambda v: model["predictor"](model["online"](v)), v1, v2, args)
    target = model["online"] if args.no_ema else model["target"]
    with torch.set_grad_enabled(args.no_sg):  # stop-gradient on the target branch
        z1, z2 = common.views(target, v1, v2, args)
    return (byol_loss(p1, z2) + byol_loss(p2, z1)).mean()


def target_tau(step, total, args):
    """tau of the target EMA at the client's step (1-based) of total: constant, or BYOL's cosine
    tau_k = 1 - (1 - tau) (cos(pi k / K) + 1) / 2, rising from tau to 1."""
    if args.tau_schedule == "constant":
        return args.tau
    return 1 - (1 - args.tau) * (math.cos(math.pi * min(step / total, 1.0)) + 1) / 2


# ---------------------------------------------------------------------------------------------
# CLIENT: local update. A fresh SGD each round (EasyFL), E epochs of shuffled batches, two masked
# views of every batch, one step per batch
# ---------------------------------------------------------------------------------------------
def local_update(client, lr, args):
    model, gen = client.model, client.gen
    params = list(model["online"].parameters()) + list(model["predictor"].parameters())  # METHOD
    if args.no_sg and not args.no_ema:  # Table 2's EMA-without-stop-gradient row: the target learns too
        params += list(model["target"].parameters())
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
            if not args.no_ema:  # METHOD: target <- tau target + (1 - tau) online, every step
                client.state["step"] = client.state.get("step", 0) + 1
                total = args.rounds * args.local_epochs * max(1, client.n // args.batch_size)
                common.ema_(model["target"], model["online"], target_tau(client.state["step"], total, args))
            losses.append(loss.item())
    return {"loss": sum(losses) / len(losses)}


# ---------------------------------------------------------------------------------------------
# FEDERATED: what a client uploads, how the server aggregates, how a client takes the result back
# ---------------------------------------------------------------------------------------------
UPLOAD = ("online", "predictor")  # the target encoder never leaves the client


def upload(client):
    """CLIENT -> SERVER: copies of the UPLOAD modules' weights and the client's cell count."""
    return {key: common.weights(client.model[key]) for key in UPLOAD}, client.n


def aggregate(uploads):
    """SERVER: FedAvg of each uploaded module, weighted by the clients' cell counts."""
    states, counts = zip(*uploads)
    return {key: common.fedavg([s[key] for s in states], counts) for key in UPLOAD}


def download(client, global_state, args):
    """SERVER -> CLIENT: the online encoder and the predictor <- the global ones. The target stays
    the client's own; the first time, it starts as a copy of the online encoder."""
    model = client.model
    for key in UPLOAD:
        model[key].load_state_dict(global_state[key])
    if "started" not in client.state:
        model["target"].load_state_dict(model["online"].state_dict())
        client.state["started"] = True
    return {}


if __name__ == "__main__":
    with common.user_errors():
        args = common.parse_args(Args)
        data = common.setup(args)
        model = make_model(data.X.shape[1], args)  # the server's initial global model (seeded)
        log = common.federate(args, data, model, download, local_update, upload, aggregate)
        common.finish(args, data, model, log)
