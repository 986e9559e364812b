# FedSimSiam (FedSC paper Table 1 baseline). Docs: README.md#fedsimsiampy
"""FedSimSiam: each client trains SimSiam locally (encoder + predictor, stop-gradient, no momentum
encoder), uploads its encoder and predictor, and replaces both with the FedAvg'd global ones."""
import time
import typing
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args(common.FedArgs):
    """FedSimSiam on scRNA-seq counts; defaults are the paper's protocol (README: Protocol)."""
    # METHOD: SimSiam local training
    predictor: typing.Literal["linear", "mlp"] = "linear"
    """predictor q: Linear(128,128) as the paper, or SimSiam's bottleneck Linear-BN-ReLU-Linear 128->32->128"""


# ---------------------------------------------------------------------------------------------
# METHOD: networks. Encoder g(f(x)) and predictor q; no target network
# ---------------------------------------------------------------------------------------------
def make_model(n_genes, args):
    online = common.Encoder(common.backbone(n_genes), nn.Linear(60, 128))
    if args.predictor == "linear":
        predictor = nn.Linear(128, 128)
    else:
        predictor = nn.Sequential(nn.Linear(128, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 128))
    return nn.ModuleDict(dict(online=online, predictor=predictor))


def trainable(model, args):
    """The local optimizer updates the encoder and the predictor."""
    return list(model["online"].parameters()) + list(model["predictor"].parameters())


# ---------------------------------------------------------------------------------------------
# METHOD: loss. L = -1/2 cos(p1, sg(z2)) - 1/2 cos(p2, sg(z1)), z = g(f(v)), p = q(z)
# ---------------------------------------------------------------------------------------------
def loss_fn(model, v1, v2, client, args):
    z1, z2 = model["online"](v1), model["online"](v2)
    p1, p2 = model["predictor"](z1), model["predictor"](z2)
    # stop-gradient: the z branch is detached, only the predictor branch gets gradients
    return -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=-1).mean()
                   + F.cosine_similarity(p2, z1.detach(), dim=-1).mean())


# ---------------------------------------------------------------------------------------------
# FEDERATED: what a client uploads, and how it takes the global model back
# ---------------------------------------------------------------------------------------------
UPLOAD = ("online", "predictor")  # everything the client has


def download(client, global_state, rnd, args):
    for key in UPLOAD:  # encoder and predictor <- the global ones
        client.model[key].load_state_dict(global_state[key])
    return {}


if __name__ == "__main__":
    args = common.parse_args(Args)
    with common.user_errors():
        t_start = time.time()
        data = common.setup(args, "FedSimSiam")
        model = make_model(data.X.shape[1], args)  # the server's initial global model (seeded)
        model = common.federate(args, data, model, UPLOAD, download, loss_fn, trainable)
        common.finish(args, data, model, t_start)
