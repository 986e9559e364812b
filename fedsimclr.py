# FedSimCLR (FedSC paper Table 1 baseline). Docs: README.md#fedsimclrpy
"""FedSimCLR: each client trains SimCLR locally (encoder g(f(x)), NT-Xent over 2B views with 2B-2
negatives per anchor), uploads its encoder and replaces it with the FedAvg'd global one."""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args(common.FedArgs):
    """FedSimCLR on scRNA-seq counts; defaults are the paper's protocol (README: Protocol)."""
    # METHOD: SimCLR local training
    temperature: float = 0.07
    """NT-Xent temperature (EasyFL and contrastive-sc 0.07; SimCLR on CIFAR 0.5)"""


# ---------------------------------------------------------------------------------------------
# METHOD: networks. Encoder g(f(x)) only
# ---------------------------------------------------------------------------------------------
def make_model(n_genes, args):
    online = common.Encoder(common.backbone(n_genes), nn.Linear(60, 128))
    return nn.ModuleDict(dict(online=online))


def trainable(model, args):
    """The local optimizer updates the encoder."""
    return list(model["online"].parameters())


# ---------------------------------------------------------------------------------------------
# METHOD: loss. NT-Xent: for each of the 2B views, one positive (its other view), 2B-2 negatives
# ---------------------------------------------------------------------------------------------
def nt_xent(z1, z2, temperature):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])  # view i <-> view i + B
    return F.cross_entropy(sim, positive)


def loss_fn(model, v1, v2, client, args):
    return nt_xent(model["online"](v1), model["online"](v2), args.temperature)


# ---------------------------------------------------------------------------------------------
# FEDERATED: what a client uploads, and how it takes the global model back
# ---------------------------------------------------------------------------------------------
UPLOAD = ("online",)  # everything the client has


def download(client, global_state, rnd, args):
    for key in UPLOAD:  # encoder <- the global one
        client.model[key].load_state_dict(global_state[key])
    return {}


if __name__ == "__main__":
    args = common.parse_args(Args)
    with common.user_errors():
        t_start = time.time()
        data = common.setup(args, "FedSimCLR")
        model = make_model(data.X.shape[1], args)  # the server's initial global model (seeded)
        model = common.federate(args, data, model, UPLOAD, download, loss_fn, trainable)
        common.finish(args, data, model, t_start)
