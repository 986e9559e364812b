# FedBYOL (the FedU / FedEMA papers' baseline; FedSC paper Table 1-2). Docs: README.md#fedbyolpy
"""FedBYOL: each client trains BYOL locally (online encoder + predictor, EMA target, stop-gradient),
uploads its online encoder and predictor, and replaces both with the FedAvg'd global ones; the
target encoder stays on the client. Flags remove the predictor, the EMA or the stop-gradient
(the paper's Table 2 ablation)."""
import copy
import math
import time
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args(common.FedArgs):
    """FedBYOL on scRNA-seq counts; defaults are the paper's protocol (README: Protocol)."""
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
    parameters join the optimizer and also get the EMA blend after each step (README: deviation 9)"""


# ---------------------------------------------------------------------------------------------
# METHOD: networks. Online encoder g(f(x)), predictor q, target = EMA copy of the online encoder
# ---------------------------------------------------------------------------------------------
def make_model(n_genes, args):
    online = common.Encoder(common.backbone(n_genes), nn.Linear(60, 128))
    if args.no_predictor:
        predictor = nn.Identity()
    elif args.predictor == "linear":
        predictor = nn.Linear(128, 128)
    else:
        predictor = nn.Sequential(nn.Linear(128, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 128))
    target = copy.deepcopy(online).requires_grad_(args.no_sg and not args.no_ema)
    return nn.ModuleDict(dict(online=online, predictor=predictor, target=target))


def trainable(model, args):
    """The local optimizer updates the online encoder and the predictor (and, with --no-sg and an
    EMA target, the target as well)."""
    params = list(model["online"].parameters()) + list(model["predictor"].parameters())
    return params + (list(model["target"].parameters()) if args.no_sg and not args.no_ema else [])


# ---------------------------------------------------------------------------------------------
# METHOD: loss. Symmetric BYOL, 2 - 2 cos(q(g(f(v1))), sg(target(v2))) + the swapped pair (Eq. 2)
# ---------------------------------------------------------------------------------------------
def byol_loss(p, z):
    return 2 - 2 * F.cosine_similarity(p, z, dim=-1)


def loss_fn(model, v1, v2, client, args):
    p1, p2 = model["predictor"](model["online"](v1)), model["predictor"](model["online"](v2))
    target = model["online"] if args.no_ema else model["target"]
    with torch.set_grad_enabled(args.no_sg):  # stop-gradient on the target branch
        z1, z2 = target(v1), target(v2)
    return (byol_loss(p1, z2) + byol_loss(p2, z1)).mean()


@torch.no_grad()
def ema_(target, online, tau):
    """target <- tau * target + (1 - tau) * online, over the parameters."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - tau)


def after_step(model, client, step, args):
    if args.no_ema:
        return
    tau = args.tau
    if args.tau_schedule == "cosine":  # BYOL: tau_k = 1 - (1 - tau) (cos(pi k / K) + 1) / 2
        k = client.state["steps"] = client.state.get("steps", 0) + 1
        total = args.rounds * args.local_epochs * max(1, client.n // args.batch_size)
        tau = 1 - (1 - args.tau) * (math.cos(math.pi * min(k / total, 1.0)) + 1) / 2
    ema_(model["target"], model["online"], tau)


# ---------------------------------------------------------------------------------------------
# FEDERATED: what a client uploads, and how it takes the global model back
# ---------------------------------------------------------------------------------------------
UPLOAD = ("online", "predictor")  # the target encoder never leaves the client


def download(client, global_state, rnd, args):
    model, state = client.model, client.state
    for key in UPLOAD:  # online encoder and predictor <- the global ones
        model[key].load_state_dict(global_state[key])
    if "trained" not in state:  # round 0: the target starts as a copy of the online encoder
        model["target"].load_state_dict(model["online"].state_dict())
        state["trained"] = True
    return {}


if __name__ == "__main__":
    args = common.parse_args(Args)
    with common.user_errors():
        t_start = time.time()
        data = common.setup(args, "FedBYOL")
        model = make_model(data.X.shape[1], args)  # the server's initial global model (seeded)
        model = common.federate(args, data, model, UPLOAD, download, loss_fn, trainable, after_step)
        common.finish(args, data, model, t_start)
