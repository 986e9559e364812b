# FedPCA: exact federated PCA + KMeans, the training-free reference next to centralized.py --baseline pca
"""FedPCA: each client sends its cell count, per-gene sums and gene x gene sums of products; the
server adds them up, takes the top eigenvectors of the pooled covariance (the PCA of all the
clients' cells, exactly: no approximation, no rounds) and sends the components and the mean back;
each client projects its own cells. KMeans then clusters the projections, as for every method.

Cells held by no client (--partition class can leave some out) have no site to project them: here
the server's components and mean are applied to them too, as if the server sent them to anyone.
They are not in the PCA; they are in the pooled evaluation (as every method embeds every cell) and,
as for every method, not in --evaluate federated."""
import common  # first, before any other import: a Ctrl-C from here on ends with one line (cli.py)
import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass
class Args(common.FedArgs):
    """FedPCA on scRNA-seq counts: PCA of the clients' cells from per-site sums, then KMeans.
    Nothing is trained: --rounds, --local-epochs, --batch-size, --lr, --momentum, --weight-decay,
    --lr-schedule, --mask-rate and --eval-every are refused, and so is --l2norm (as in centralized.py
    --baseline pca, KMeans gets the projections as they are). --embed and --bn-stats describe an
    encoder: other values than their defaults are refused."""
    # METHOD: the projection
    n_components: int = 50
    """principal components kept (at most the number of genes)"""
    method: str = dataclasses.field(default="FedPCA", init=False)

    def __post_init__(self):
        common.check(self.n_components >= 1, f"--n-components must be at least 1, got {self.n_components}")
        common.check(self.embed == "backbone", "--embed is for an encoder's layers; FedPCA has none")
        common.check(self.bn_stats == "running", "--bn-stats is for an encoder's BatchNorm; FedPCA has none")
        common.check(self.anchor == 0, "--anchor trains a head on an encoder; FedPCA has none")


# ---------------------------------------------------------------------------------------------
# SITE -> SERVER: the cell count, per-gene sums, gene x gene sums of products (no row per cell)
# ---------------------------------------------------------------------------------------------
def site_sums(x):
    """SITE: (n_k, sum_i x_i, sum_i x_i x_i^T) over its cells, in float64: a number, a g-vector and
    a g x g matrix, whatever the number of cells."""
    x = x.astype(np.float64)
    return len(x), x.sum(0), x.T @ x


# ---------------------------------------------------------------------------------------------
# SERVER: pooled mean and covariance from the sums, their top eigenvectors
# ---------------------------------------------------------------------------------------------
def server_pca(sent, n_components):
    """SERVER: mean = sum / n, covariance = (S - n mean mean^T) / (n - 1), and its top n_components
    eigenvectors (largest eigenvalue first) as the columns of a g x c matrix. Each component's sign
    is fixed (its largest-|value| entry positive), so the result does not depend on LAPACK's signs.
    Returns (mean, components, the fraction of the variance they explain)."""
    n = sum(s[0] for s in sent)
    mean = sum(s[1] for s in sent) / n
    cov = (sum(s[2] for s in sent) - n * np.outer(mean, mean)) / (n - 1)
    values, vectors = np.linalg.eigh(cov)  # ascending eigenvalues
    c = min(n_components, len(values))
    components = vectors[:, ::-1][:, :c]
    components = components * np.sign(components[np.abs(components).argmax(0), np.arange(c)])
    return mean, components, values[::-1][:c].sum() / max(values.sum(), 1e-300)


# ---------------------------------------------------------------------------------------------
# SERVER -> SITE: the mean and the components; each site projects its own cells
# ---------------------------------------------------------------------------------------------
def site_project(x, mean, components):
    """SITE: its cells in the principal components, (x - mean) @ components; they stay on the site."""
    return (x.astype(np.float64) - mean) @ components


def federated_pca(args, data):
    """The embedding of every row of data.X: each client's cells projected by that client, the
    cells of no client with the same mean and components (see the module's docstring)."""
    sent = [site_sums(data.X[idx]) for idx in data.parts]  # on each SITE
    mean, components, explained = server_pca(sent, args.n_components)  # on the SERVER
    h = np.empty((len(data.X), components.shape[1]))
    for idx in data.parts:  # on each SITE
        h[idx] = site_project(data.X[idx], mean, components)
    unheld = np.setdiff1d(np.arange(len(data.X)), np.concatenate(data.parts))
    if len(unheld):
        h[unheld] = site_project(data.X[unheld], mean, components)
    print(f"PCA of {sum(s[0] for s in sent)} cells on {len(sent)} sites: {components.shape[1]} "
          f"components explain {100 * explained:.1f}% of the variance", flush=True)
    return h


if __name__ == "__main__":
    with common.user_errors():
        args = common.parse_args(Args)
        data = common.setup(args)
        h = federated_pca(args, data)
        common.finish(args, data, h=h)
