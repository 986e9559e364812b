# FedSC (Mo & Chen): federated BYOL + a divergence-aware EMA download. Docs: docs/protocol.md#fedscpy
"""FedSC: each client trains BYOL locally (online encoder + predictor, EMA target, stop-gradient),
uploads its online encoder and predictor, the server averages them (FedAvg), and each client takes
the global model back through an EMA whose rate mu_k grows with the divergence between the global
and its own encoder (paper Eq. 3-4); the target encoder stays on the client."""
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
    """FedSC on scRNA-seq counts; defaults are the paper's protocol (docs/protocol.md)."""
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
    mu_rule: typing.Literal["scaled", "literal", "relative", "bounded"] = "scaled"
    """scaled: mu = min(lambda_k * d, 1), lambda_k = alpha / d at the first EMA (FedEMA);
    literal: the paper's Eq. 4, mu = min(alpha / d, 1); relative: mu = min(alpha * d / dbar_k, 1),
    dbar_k the running mean of the client's earlier divergences (free of the lr's scale);
    bounded: mu = alpha * min(d / dbar_k, 1), never above alpha (no feedback loop at mu = 1)"""
    method: str = dataclasses.field(default="FedSC", init=False)

    def __post_init__(self):
        common.check(0 <= self.tau <= 1, f"--tau must be in [0, 1], got {self.tau}")
        common.check(self.alpha > 0, f"--alpha must be positive, got {self.alpha}")


# ---------------------------------------------------------------------------------------------
# METHOD: networks. Online encoder g(f(x)), predictor q, target = EMA copy of the online encoder
# ---------------------------------------------------------------------------------------------
def make_model(n_genes, args):
    online = common.Encoder(common.backbone(n_genes), nn.Linear(common.EMBED_DIM, common.PROJ_DIM))
    if args.predictor == "linear":
        predictor = nn.Linear(common.PROJ_DIM, common.PROJ_DIM)
    else:
        predictor = nn.Sequential(nn.Linear(common.PROJ_DIM, 512), nn.BatchNorm1d(512), nn.ReLU(),
                                  nn.Linear(512, common.PROJ_DIM))
    target = copy.deepcopy(online).requires_grad_(False)
    return nn.ModuleDict(dict(online=online, predictor=predictor, target=target))


# ---------------------------------------------------------------------------------------------
# METHOD: loss. Symmetric BYOL, 2 - 2 cos(q(g(f(v1))), sg(target(v2))) + the swapped pair (Eq. 2)
# ---------------------------------------------------------------------------------------------
def byol_loss(p, z):
    return 2 - 2 * F.cosine_similarity(p, z, dim=-1)


def loss_fn(model, v1, v2, args):
    p1, p2 = common.views(lambda v: model["predictor"](model["online"](v)), v1, v2, args)
    with torch.no_grad():  # stop-gradient on the target branch
        z1, z2 = common.views(model["target"], v1, v2, args)
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
            # METHOD: target <- tau target + (1 - tau) online, every step
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


def divergence(global_online, online):
    """d_k = ||W_g^o - W_k^o||_2 over all trainable parameters of the online encoder g(f(.))."""
    return math.sqrt(sum(((global_online[k] - p.detach()) ** 2).sum().item()
                         for k, p in online.named_parameters()))


def decay_rate(d, state, args):
    """mu_k. 'scaled': lambda_k = alpha / d fixed at the first EMA download, mu = min(lambda_k d, 1),
    so mu = alpha then and grows with the divergence after. 'literal': Eq. 4, min(alpha / d, 1).
    'relative': lambda_k = alpha / dbar_k re-estimated every round from the client's running mean
    divergence dbar_k (EMA 0.9), so mu = alpha at a typical divergence and more above it, whatever
    the learning rate and its schedule do to the size of d. It feeds back on itself: a client at
    mu = 1 keeps its own model, so d grows, d / dbar_k stays high and mu stays at 1 (a run's d can
    grow ~10% a round for 20 rounds). 'bounded' is 'relative' with mu capped at alpha: lower when
    the client is closer to the global model than usual, never a client that ignores it."""
    if d == 0:  # local == global (e.g. a single client): the merge changes nothing
        return 1.0
    if args.mu_rule == "literal":
        return min(args.alpha / d, 1.0)
    if args.mu_rule in ("relative", "bounded"):
        dbar = state.get("dbar", d)
        state["dbar"] = 0.9 * dbar + 0.1 * d
        return min(args.alpha * d / dbar, 1.0 if args.mu_rule == "relative" else args.alpha)
    state.setdefault("lam", args.alpha / d)
    return min(state["lam"] * d, 1.0)


def ema_merge(local, glob, mu):
    """Eq. 3: W_k <- mu W_k + (1 - mu) W_g, for every float entry (BN running stats too)."""
    return {k: mu * v + (1 - mu) * glob[k] if v.is_floating_point() else glob[k] for k, v in local.items()}


def download(client, global_state, args):
    """SERVER -> CLIENT: the first time, the global online encoder and predictor as they are (and
    the target starts as a copy of the online encoder); afterwards an EMA of the client's own
    modules towards the global ones, with the same mu for both. The target stays the client's own."""
    model, state = client.model, client.state
    if "started" not in state:
        for key in UPLOAD:
            model[key].load_state_dict(global_state[key])
        model["target"].load_state_dict(model["online"].state_dict())
        state["started"] = True
        return {}
    d = divergence(global_state["online"], model["online"])
    mu = decay_rate(d, state, args)
    for key in UPLOAD:
        model[key].load_state_dict(ema_merge(model[key].state_dict(), global_state[key], mu))
    return {"mu": mu, "div": d}


if __name__ == "__main__":
    with common.user_errors():
        args = common.parse_args(Args)
        data = common.setup(args)
        model = make_model(data.X.shape[1], args)  # the server's initial global model (seeded)
        log = common.federate(args, data, model, download, local_update, upload, aggregate)
        common.finish(args, data, model, log)
