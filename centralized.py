# Centralized reference rows of Table 1 (no federation: all cells in one place). Docs: docs/protocol.md#centralizedpy
"""Centralized baselines on the same preprocessed cells:
  pca      PCA (50 components) of the preprocessed matrix + KMeans: a strong, honest baseline
  pca_raw  the paper's PCA row: PCA(2) of the raw ceil'd counts + KMeans (contrastive-sc's notebook)
  csc      contrastive-sc itself: Dropout(0.9) inside the encoder, NT-Xent (T 0.07), Adam lr 0.4,
           batch 200, 30 epochs
For centralized training of a federated method, run it with one client: --clients 1 --partition iid."""
import cli  # first, before any other import: a Ctrl-C from here on ends with one line (cli.py)
import dataclasses
import json
import time
import typing
from dataclasses import dataclass

import common
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


NAMES = {"pca": "PCA", "pca_raw": "PCA-raw (paper)", "csc": "contrastive-sc"}


@dataclass
class Args(common.DataArgs):
    """Centralized baselines: all cells in one place, no federation."""
    baseline: typing.Literal["pca", "pca_raw", "csc"] = "pca"
    """which centralized baseline to run"""
    n_components: int = 50
    """--baseline pca: principal components kept"""
    epochs: int = 30
    """--baseline csc: training epochs"""
    csc_lr: float = 0.4
    """--baseline csc: Adam learning rate (contrastive-sc's default)"""
    csc_batch: int = 200
    """--baseline csc: batch size"""
    method: str = dataclasses.field(default="PCA", init=False)

    def __post_init__(self):
        self.method = NAMES[self.baseline]
        common.check(self.n_components >= 1, f"--n-components must be at least 1, got {self.n_components}")
        common.check(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        common.check(self.csc_lr > 0, f"--csc-lr must be positive, got {self.csc_lr}")
        common.check(self.csc_batch >= 2, f"--csc-batch must be at least 2 (BatchNorm), got {self.csc_batch}")


def supcon_loss(z1, z2, temperature):
    """contrastive-sc's SupConLoss without labels (= NT-Xent): each of the 2B views has one positive,
    its other view, and 2B-2 negatives. The same loss as fedsimclr.py's, kept here so that the
    centralized rows depend on no method file."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]))


def pca(X, n_components, seed):
    from sklearn.decomposition import PCA
    return PCA(n_components=min(n_components, *X.shape), random_state=seed).fit_transform(X)


def contrastive_sc(X, args):
    """contrastive-sc's train_model: the same batch twice through an encoder whose first layer is
    Dropout(0.9), so the two views differ by their dropout masks; lr follows its cosine formula
    with the epoch count hard-coded to 500."""
    gen = torch.Generator().manual_seed(args.seed)
    net = nn.Sequential(nn.Dropout(0.9), common.backbone(X.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=args.csc_lr)
    X = torch.from_numpy(X)
    for epoch in range(args.epochs):
        for g in opt.param_groups:
            g["lr"] = args.csc_lr * 0.5 * (1 + np.cos(np.pi * epoch / 500))
        perm, losses = torch.randperm(len(X), generator=gen), []
        for idx in perm.split(args.csc_batch):
            if len(idx) < 2:
                continue
            loss = supcon_loss(net(X[idx]), net(X[idx]), 0.07)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}/{args.epochs}  loss {np.mean(losses):.4f}", flush=True)
    net.eval()
    with torch.no_grad():
        h = net(X)
    return (F.normalize(h, dim=1) if args.l2norm else h).numpy().astype(np.float64)


if __name__ == "__main__":
    with common.user_errors():
        args = common.parse_args(Args)
        t_start = time.time()
        cli.check_args(args)
        cli.resolve(args)
        torch.set_num_threads(args.threads)
        print(f"config {json.dumps(vars(args))}", flush=True)
        common.seed_everything(args.seed)
        data, counts = common.load(args)
        cli.check_data(args, data)
        data.parts, data.t_start = [np.arange(len(data.X))], t_start
        if args.baseline == "pca":
            h = pca(data.X, args.n_components, args.seed)
        elif args.baseline == "pca_raw":
            counts = counts[data.cells]
            counts = counts.toarray() if hasattr(counts, "toarray") else counts
            h = pca(np.ceil(counts.astype(np.float64)), 2, args.seed)
        else:
            h = contrastive_sc(data.X, args)
        common.finish(args, data, h=h)
