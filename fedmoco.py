# FedMoCo v1 / v2 (FedSC paper Table 1 baselines). Docs: docs/protocol.md#fedmocopy
"""FedMoCo: each client trains MoCo locally (query encoder, momentum key encoder, a queue of past
keys as negatives), uploads its query encoder, the server averages the query encoders (FedAvg),
and each client replaces its query encoder with the global one. The key encoder restarts from the
query encoder every round; the queue never leaves the client.
--version 2 uses MoCo v2's MLP head and temperature 0.2."""
import common  # first, before any other import: a Ctrl-C from here on ends with one line (cli.py)
import copy
import dataclasses
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Args(common.FedArgs):
    """FedMoCo on scRNA-seq counts; defaults are the paper's protocol (docs/protocol.md)."""
    # METHOD: MoCo local training
    version: typing.Literal[1, 2] = 1
    """1: linear head 60->128, T 0.07; 2: MLP head 60->60->128 (ReLU), T 0.2"""
    temperature: float = 0.0
    """softmax temperature T; 0 = the version's value (0.07 for v1, 0.2 for v2)"""
    m: float = 0.99
    """momentum of the key encoder, updated before each step's keys"""
    queue_size: int = 256
    """negatives kept in each client's local queue (clients hold 120-2000 cells)"""
    symmetric: bool = True
    """symmetric loss (both view orders, both keys enqueued) as EasyFL; --no-symmetric for MoCo's own"""
    method: str = dataclasses.field(default="FedMoCoV1", init=False)

    def __post_init__(self):  # resolved once, so the config line and the row record the values used
        self.method = f"FedMoCoV{self.version}"
        self.temperature = self.temperature or (0.07 if self.version == 1 else 0.2)
        common.check(self.temperature > 0, f"--temperature must be positive, got {self.temperature}")
        common.check(self.queue_size >= 1, f"--queue-size must be at least 1, got {self.queue_size}")
        common.check(0 <= self.m <= 1, f"--m must be in [0, 1], got {self.m}")
        common.check(not self.one_pass, "--one-pass is not offered for MoCo (its keys come from a second encoder)")


# ---------------------------------------------------------------------------------------------
# METHOD: networks. Query encoder g(f(x)) ("online") and its momentum copy, the key encoder
# ---------------------------------------------------------------------------------------------
def make_model(n_genes, args):
    if args.version == 1:
        head = nn.Linear(common.EMBED_DIM, common.PROJ_DIM)
    else:
        head = nn.Sequential(nn.Linear(common.EMBED_DIM, common.EMBED_DIM), nn.ReLU(),
                             nn.Linear(common.EMBED_DIM, common.PROJ_DIM))
    online = common.Encoder(common.backbone(n_genes), head)
    key = copy.deepcopy(online).requires_grad_(False)  # the momentum copy: no gradient
    return nn.ModuleDict(dict(online=online, key=key))


# ---------------------------------------------------------------------------------------------
# METHOD: loss. InfoNCE of each query against its key (the positive) and the queue (negatives)
# ---------------------------------------------------------------------------------------------
def contrast(q, k, queue, temperature):
    pos = (q * k).sum(1, keepdim=True)
    logits = torch.cat([pos, q @ queue], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))  # the positive is class 0


def loss_fn(model, v1, v2, queue, args):
    """Returns the loss and the keys to enqueue."""
    q1 = F.normalize(model["online"](v1), dim=1)
    with torch.no_grad():  # the key encoder gets no gradient
        k2 = F.normalize(model["key"](v2), dim=1)
    if not args.symmetric:
        return contrast(q1, k2, queue, args.temperature), k2
    q2 = F.normalize(model["online"](v2), dim=1)
    with torch.no_grad():
        k1 = F.normalize(model["key"](v1), dim=1)
    return contrast(q1, k2, queue, args.temperature) + contrast(q2, k1, queue, args.temperature), torch.cat([k1, k2])


def enqueue(state, keys):
    """Write keys into the queue's columns from ptr on, wrapping around (short batches allowed)."""
    queue, size = state["queue"], state["queue"].shape[1]
    keys = keys[-size:]
    queue[:, (state["ptr"] + torch.arange(len(keys))) % size] = keys.T
    state["ptr"] = (state["ptr"] + len(keys)) % size


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
            common.ema_(model["key"], model["online"], args.m)  # METHOD: key <- m key + (1-m) query
            loss, keys = loss_fn(model, v1, v2, client.state["queue"].clone(), args)
            if args.anchor:  # --anchor: each cell also regresses its federated-PCA coordinates (common.py)
                loss = loss + args.anchor * common.anchor_loss(model, x, client.state["anchor"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            enqueue(client.state, keys)  # METHOD: this step's keys become later steps' negatives
            losses.append(loss.item())
    return {"loss": sum(losses) / len(losses)}


# ---------------------------------------------------------------------------------------------
# FEDERATED: what a client uploads, how the server aggregates, how a client takes the result back
# ---------------------------------------------------------------------------------------------
UPLOAD = ("online",)  # the key encoder and the queue never leave the client


def upload(client):
    """CLIENT -> SERVER: copies of the UPLOAD modules' weights and the client's cell count."""
    return {key: common.weights(client.model[key]) for key in UPLOAD}, client.n


def aggregate(uploads):
    """SERVER: FedAvg of each uploaded module, weighted by the clients' cell counts."""
    states, counts = zip(*uploads)
    return {key: common.fedavg([s[key] for s in states], counts) for key in UPLOAD}


def download(client, global_state, args):
    """SERVER -> CLIENT: the query encoder <- the global one; the key encoder restarts from it.
    The first time, the client also starts its own queue of random unit keys."""
    for key in UPLOAD:
        client.model[key].load_state_dict(global_state[key])
    client.model["key"].load_state_dict(client.model["online"].state_dict())
    if "queue" not in client.state:
        queue = torch.randn(common.PROJ_DIM, args.queue_size, generator=client.gen)
        client.state.update(queue=F.normalize(queue, dim=0), ptr=0)
    return {}


if __name__ == "__main__":
    with common.user_errors():
        args = common.parse_args(Args)
        data = common.setup(args)
        model = make_model(data.X.shape[1], args)  # the server's initial global model (seeded)
        log = common.federate(args, data, model, download, local_update, upload, aggregate)
        common.finish(args, data, model, log)
