# FedMoCo v1 / v2 (FedSC paper Table 1 baselines). Docs: README.md#fedmocopy
"""FedMoCo: each client trains MoCo locally (query encoder, momentum key encoder, a queue of past
keys as negatives), uploads its query encoder and replaces it with the FedAvg'd global one. The key
encoder restarts from the query encoder every round; the queue never leaves the client.
--version 2 uses MoCo v2's MLP head and temperature 0.2."""
import copy
import time
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args(common.FedArgs):
    """FedMoCo on scRNA-seq counts; defaults are the paper's protocol (README: Protocol)."""
    # METHOD: MoCo local training
    version: typing.Literal[1, 2] = 1
    """1: linear head 60->128, T 0.07; 2: MLP head 60->60->128 (ReLU), T 0.2"""
    temperature: float = 0.0
    """softmax temperature T; 0 = the version's value (0.07 for v1, 0.2 for v2)"""
    m: float = 0.99
    """momentum of the key encoder, updated before each step's keys"""
    queue_size: int = 256
    """negatives kept in each client's local queue (a multiple of the batch size; clients hold 120-2000 cells)"""
    symmetric: bool = True
    """symmetric loss (both view orders, both keys enqueued) as EasyFL; --no-symmetric for MoCo's own"""


# ---------------------------------------------------------------------------------------------
# METHOD: networks. Query encoder g(f(x)) ("online") and its momentum copy, the key encoder
# ---------------------------------------------------------------------------------------------
def make_model(n_genes, args):
    if args.version == 1:
        head = nn.Linear(60, 128)
    else:
        head = nn.Sequential(nn.Linear(60, 60), nn.ReLU(), nn.Linear(60, 128))
    online = common.Encoder(common.backbone(n_genes), head)
    key = copy.deepcopy(online).requires_grad_(False)
    return nn.ModuleDict(dict(online=online, key=key))


def trainable(model, args):
    """The local optimizer updates the query encoder only."""
    return list(model["online"].parameters())


# ---------------------------------------------------------------------------------------------
# METHOD: loss. InfoNCE of q against its key (positive) and the queue (negatives)
# ---------------------------------------------------------------------------------------------
def contrast(q, k, queue, temperature):
    pos = (q * k).sum(1, keepdim=True)
    logits = torch.cat([pos, q @ queue], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))  # the positive is class 0


def enqueue(state, keys):
    """Write keys into the queue's columns from ptr on, wrapping around (short batches allowed)."""
    queue, size = state["queue"], state["queue"].shape[1]
    keys = keys[-size:]
    queue[:, (state["ptr"] + torch.arange(len(keys))) % size] = keys.T
    state["ptr"] = (state["ptr"] + len(keys)) % size


@torch.no_grad()
def ema_(target, online, tau):
    """target <- tau * target + (1 - tau) * online, over the parameters."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - tau)


def loss_fn(model, v1, v2, client, args):
    state, T = client.state, args.temperature or (0.07 if args.version == 1 else 0.2)
    if "queue" not in state:  # the client's own queue: random unit vectors at first
        gen = torch.Generator().manual_seed(args.seed * 1000 + client.cid)
        state["queue"], state["ptr"] = F.normalize(torch.randn(128, args.queue_size, generator=gen), dim=0), 0
    ema_(model["key"], model["online"], args.m)  # momentum update before computing the keys
    q1 = F.normalize(model["online"](v1), dim=1)
    with torch.no_grad():
        k2 = F.normalize(model["key"](v2), dim=1)
    queue = state["queue"].clone()
    if not args.symmetric:
        enqueue(state, k2)
        return contrast(q1, k2, queue, T)
    q2 = F.normalize(model["online"](v2), dim=1)
    with torch.no_grad():
        k1 = F.normalize(model["key"](v1), dim=1)
    enqueue(state, torch.cat([k1, k2]))
    return contrast(q1, k2, queue, T) + contrast(q2, k1, queue, T)


# ---------------------------------------------------------------------------------------------
# FEDERATED: what a client uploads, and how it takes the global model back
# ---------------------------------------------------------------------------------------------
UPLOAD = ("online",)  # the key encoder and the queue never leave the client


def download(client, global_state, rnd, args):
    for key in UPLOAD:  # query encoder <- the global one
        client.model[key].load_state_dict(global_state[key])
    client.model["key"].load_state_dict(client.model["online"].state_dict())  # key restarts from it
    return {}


if __name__ == "__main__":
    args = common.parse_args(Args)
    with common.user_errors():
        t_start = time.time()
        data = common.setup(args, f"FedMoCoV{args.version}")
        model = make_model(data.X.shape[1], args)  # the server's initial global model (seeded)
        model = common.federate(args, data, model, UPLOAD, download, loss_fn, trainable)
        common.finish(args, data, model, t_start)
