# FedSC (Mo & Chen): federated BYOL + a divergence-aware EMA download. Docs: README.md#fedscpy
"""FedSC: each client trains BYOL locally (online encoder + predictor, EMA target, stop-gradient),
uploads its online encoder and predictor, and takes the FedAvg'd global model back through an EMA
whose rate mu_k grows with the divergence between the global and its own encoder (paper Eq. 3-4)."""
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
    """FedSC on scRNA-seq counts; defaults are the paper's protocol (README: Protocol)."""
    # METHOD: BYOL local training
    tau: float = 0.99
    """EMA rate of the local target encoder, applied after every step (EasyFL 0.99)"""
    tau_schedule: typing.Literal["constant", "cosine"] = "constant"
    """constant tau, or BYOL's cosine increase from tau to 1 over the client's steps"""
    predictor: typing.Literal["linear", "mlp"] = "linear"
    """predictor q: Linear(128,128) as the paper, or Linear-BN-ReLU-Linear with 512 hidden"""
    # METHOD: divergence-aware download
    alpha: float = 0.7
    """target of the auto-scaler: mu_k = alpha at a client's first EMA download"""
    mu_rule: typing.Literal["scaled", "literal"] = "scaled"
    """scaled: mu = min(lambda_k * d, 1), lambda_k = alpha / d at the first EMA (FedEMA);
    literal: the paper's Eq. 4, mu = min(alpha / d, 1)"""


# ---------------------------------------------------------------------------------------------
# METHOD: networks. Online encoder g(f(x)), predictor q, target = EMA copy of the online encoder
# ---------------------------------------------------------------------------------------------
def make_model(n_genes, args):
    online = common.Encoder(common.backbone(n_genes), nn.Linear(60, 128))
    if args.predictor == "linear":
        predictor = nn.Linear(128, 128)
    else:
        predictor = nn.Sequential(nn.Linear(128, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 128))
    target = copy.deepcopy(online).requires_grad_(False)
    return nn.ModuleDict(dict(online=online, predictor=predictor, target=target))


def trainable(model, args):
    """The local optimizer updates the online encoder and the predictor, never the target."""
    return list(model["online"].parameters()) + list(model["predictor"].parameters())


# ---------------------------------------------------------------------------------------------
# METHOD: loss. Symmetric BYOL, 2 - 2 cos(q(g(f(v1))), sg(target(v2))) + the swapped pair (Eq. 2)
# ---------------------------------------------------------------------------------------------
def byol_loss(p, z):
    return 2 - 2 * F.cosine_similarity(p, z, dim=-1)


def loss_fn(model, v1, v2, client, args):
    p1, p2 = model["predictor"](model["online"](v1)), model["predictor"](model["online"](v2))
    with torch.no_grad():  # stop-gradient on the target branch
        z1, z2 = model["target"](v1), model["target"](v2)
    return (byol_loss(p1, z2) + byol_loss(p2, z1)).mean()


@torch.no_grad()
def ema_(target, online, tau):
    """target <- tau * target + (1 - tau) * online, over the parameters."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - tau)


def after_step(model, client, step, args):
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


def divergence(global_online, online):
    """d_k = ||W_g^o - W_k^o||_2 over all trainable parameters of the online encoder g(f(.))."""
    return torch.sqrt(sum(((global_online[k] - p.detach()) ** 2).sum()
                          for k, p in online.named_parameters())).item()


def decay_rate(d, state, args):
    """mu_k. 'scaled': lambda_k = alpha / d fixed at the first EMA download, mu = min(lambda_k d, 1),
    so mu = alpha then and grows with the divergence after. 'literal': Eq. 4, min(alpha / d, 1)."""
    if d == 0:  # local == global (e.g. a single client): the merge changes nothing
        return 1.0
    if args.mu_rule == "literal":
        return min(args.alpha / d, 1.0)
    state.setdefault("lam", args.alpha / d)
    return min(state["lam"] * d, 1.0)


def ema_merge(local, glob, mu):
    """Eq. 3: W_k <- mu W_k + (1 - mu) W_g, for every float entry (BN running stats too)."""
    return {k: mu * v + (1 - mu) * glob[k] if v.is_floating_point() else glob[k] for k, v in local.items()}


def download(client, global_state, rnd, args):
    model, state = client.model, client.state
    if "trained" not in state:  # round 0: no local model yet -> take the global one as it is
        for key in UPLOAD:
            model[key].load_state_dict(global_state[key])
        model["target"].load_state_dict(model["online"].state_dict())
        state["trained"] = True
        return {}
    d = divergence(global_state["online"], model["online"])
    mu = decay_rate(d, state, args)
    for key in UPLOAD:  # same mu for the encoder and the predictor; the target stays local
        model[key].load_state_dict(ema_merge(model[key].state_dict(), global_state[key], mu))
    return {"mu": mu, "div": d}


if __name__ == "__main__":
    args = common.parse_args(Args)
    with common.user_errors():
        t_start = time.time()
        data = common.setup(args, "FedSC")
        model = make_model(data.X.shape[1], args)  # the server's initial global model (seeded)
        model = common.federate(args, data, model, UPLOAD, download, loss_fn, trainable, after_step)
        common.finish(args, data, model, t_start)
