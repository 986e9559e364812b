"""What the ServerApp and the ClientApp share: where the repository's modules are, the run's
options, and arrays <-> Flower records. Nothing here keeps state between messages."""
import dataclasses
import importlib
import json
import os
import sys

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

METHODS = ("fedsimclr", "fedmoco", "fedsimsiam", "fedbyol", "fedsc")
DEFAULTS = {  # the same as [tool.flwr.app.config] in pyproject.toml (run_simulation passes no run config)
    "method": "fedsc", "rounds": 300, "seed": 0, "lr-schedule": "cosine", "args": "", "data": "10X_PBMC",
    "min-sites": 2, "out-dir": "flower-runs", "repo-path": "", "timeout": 3600, "evaluate": True}
APP_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SiteError(Exception):
    """A site could not do what it was asked (its message names the site); the run stops."""


def repo(*configs):
    """Put the repository's folder (common.py, data.py, the method files) first on sys.path. The first
    of: a 'repo-path' in the given configs (a SuperNode's node config, then the run config), the
    FEDSC_REPO environment variable, the folder above the app (a source checkout)."""
    tried = [c.get("repo-path", "") for c in configs] + [os.environ.get("FEDSC_REPO", ""), APP_PARENT]
    for path in tried:
        if path and os.path.isfile(os.path.join(path, "common.py")):
            path = os.path.abspath(path)
            if sys.path[0] != path:
                sys.path.insert(0, path)
            return path
    raise SiteError("error: the repository's modules (common.py, data.py) were not found; give their "
                    "folder as node config / run config repo-path=\"...\" or in FEDSC_REPO "
                    f"(tried: {', '.join(repr(p) for p in tried if p) or 'nothing'})")


def method_module(name):
    if name not in METHODS:
        raise SiteError(f"error: unknown method '{name}'; use one of {', '.join(METHODS)}")
    return importlib.import_module(name)


def args_to_text(args):
    """The method's Args as JSON: every option, as resolved by the server."""
    return json.dumps({f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})


def args_from_text(module, text):
    return module.Args(**json.loads(text))


# ---------------------------------------------------------------------------------------------
# Arrays <-> records: named numpy arrays (or torch tensors) in an ArrayRecord
# ---------------------------------------------------------------------------------------------
def pack(arrays):
    """{name: numpy array or torch tensor} -> ArrayRecord (exact: dtypes and bits are kept)."""
    out = {}
    for k, v in arrays.items():
        v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        out[k] = Array(v if v.flags.c_contiguous else v.copy(order="C"))  # (ascontiguousarray makes 0-d 1-d)
    return ArrayRecord(out)


def unpack(record):
    """ArrayRecord -> {name: numpy array} (writable copies)."""
    return {k: np.array(a.numpy()) for k, a in record.items()}


def flat(state):
    """{module: {tensor name: tensor}} (a method's global_state or upload) -> {"module.name": tensor}."""
    return {f"{m}.{k}": v for m, s in state.items() for k, v in s.items()}


def unflat(values):
    """The inverse of flat, from the keys with a dot: {module: {tensor name: torch tensor}}."""
    import torch
    out = {}
    for name, a in values.items():
        if "." in name:
            module, key = name.split(".", 1)
            out.setdefault(module, {})[key] = torch.as_tensor(a)
    return out


def content(payload, **records):
    """A plain dict -> the records of a message: numbers and text in 'values'; the arrays (numpy, torch) as one
    byte string in 'values' too, with their names, dtypes and shapes (one object to send, not one per array
    and record: each object is a request at every hop). A byte string above Flower's chunk size goes in
    'arrays' as an Array, which Flower sends in chunks."""
    arrays = {k: v for k, v in payload.items() if isinstance(v, np.ndarray) or hasattr(v, "detach")}
    arrays = {k: v.detach().cpu().numpy() if hasattr(v, "detach") else v for k, v in arrays.items()}
    index = [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]
    blob = b"".join(np.ascontiguousarray(v).tobytes() for v in arrays.values())
    values = {k: v for k, v in payload.items() if k not in arrays}
    if len(blob) > FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE:
        records["arrays"] = ArrayRecord({"bytes": Array(np.frombuffer(blob, np.uint8))})
    else:
        values["arrays.bytes"] = blob
    return RecordDict({"values": config(**values, **{"arrays.index": json.dumps(index)}), **records})


def plain(records):
    """The inverse of content: one plain dict of numpy arrays (exact: dtypes and bits are kept), numbers and text."""
    values = dict(records["values"])
    blob = values.pop("arrays.bytes") if "arrays.bytes" in values else records["arrays"]["bytes"].numpy().tobytes()
    at, out = 0, {}
    for name, dtype, shape in json.loads(values.pop("arrays.index")):
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        out[name] = np.frombuffer(blob[at:at + n], dtype).reshape(shape).copy()
        at += n
    return {**values, **out}


def pack_site(state):
    """A site's state ({name: numpy array or scipy sparse matrix}) -> ArrayRecord (sparse: its CSR arrays)."""
    import scipy.sparse as sp
    out = {}
    for k, v in state.items():
        if sp.issparse(v):
            v = sp.csr_matrix(v)
            out.update({f"{k}.csr.data": v.data, f"{k}.csr.indices": v.indices, f"{k}.csr.indptr": v.indptr,
                        f"{k}.csr.shape": np.array(v.shape)})
        else:
            out[k] = v
    return pack(out)


def unpack_site(record):
    """The inverse of pack_site."""
    import scipy.sparse as sp
    a = unpack(record)
    out = {k: v for k, v in a.items() if ".csr." not in k}
    for k in [k[: -len(".csr.data")] for k in a if k.endswith(".csr.data")]:
        out[k] = sp.csr_matrix(tuple(a[f"{k}.csr.{p}"] for p in ("data", "indices", "indptr")), shape=tuple(a[f"{k}.csr.shape"]))
    return out


def config(**values):
    """A ConfigRecord; numpy scalars become Python numbers, None is left out."""
    return ConfigRecord({k: v.item() if hasattr(v, "item") else v for k, v in values.items() if v is not None})
