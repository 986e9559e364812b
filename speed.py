"""Where the time of a FedSC run goes, against a matrix-multiply bound measured in the same run.

    python speed.py [--rounds 20]

Runs FedSC on 10X PBMC for a few rounds of the paper's protocol with --threads 1 and 2 (clients
trained one at a time, or two at once; seconds per round, same process, alternated), counts the
floating-point work of those rounds' matrix multiplies, measures this machine's fp32 GEMM speed on
one and two threads, and profiles one-thread rounds with torch.profiler. Writes results/speed.md
(with the operator profile) and the README's speed block. Compare speeds as ratios within one run:
absolute times move with whatever else the machine is doing.
"""
import argparse
import contextlib
import io
import os
import time
import warnings

import torch

import benchmark
import cli
import common
import fedsc

ROOT = os.path.dirname(os.path.abspath(__file__))
MATMUL = {"aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"}


def fedsc_setup(rounds, threads):
    args = common.parse_args(fedsc.Args, ["--rounds", str(rounds), "--threads", str(threads), "--out",
                                          os.path.join(ROOT, "runs", "speed.csv")])
    with contextlib.redirect_stdout(io.StringIO()):
        data = common.setup(args)
    return args, data


def seconds_per_round(args, data):
    model = fedsc.make_model(data.X.shape[1], args)
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        common.federate(args, data, model, fedsc.download, fedsc.local_update, fedsc.upload, fedsc.aggregate)
    return (time.perf_counter() - t0) / args.rounds


def round_flops(args, data):
    """Multiply-adds x 2 of one round's Linear layers: the online encoder + predictor forward and
    backward (weight gradients everywhere, input gradients except the first layer) and the
    target forward, for both views of every batch."""
    model = fedsc.make_model(data.X.shape[1], args)
    lin = lambda m: [(l.in_features, l.out_features) for l in m.modules() if isinstance(l, torch.nn.Linear)]
    online, pred, target = lin(model["online"]), lin(model["predictor"]), lin(model["target"])
    per_row = 2 * sum(i * o for i, o in online + pred) * 3 - 2 * online[0][0] * online[0][1]
    per_row += 2 * sum(i * o for i, o in target)
    steps = sum(len(common.batches(len(p), args.batch_size, torch.Generator())) for p in data.parts)
    return 2 * per_row * args.batch_size * steps * args.local_epochs  # two views


def gemm_rate(threads, seconds=1.0):
    """fp32 GFLOP/s of a (256 x 500) @ (500 x 200) product, the shape of the first layer."""
    torch.set_num_threads(threads)
    a, b = torch.randn(256, 500), torch.randn(500, 200)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(50):
            a @ b
        n += 50
    torch.set_num_threads(1)
    return 2 * 256 * 500 * 200 * n / (time.perf_counter() - t0) / 1e9


def first_layer_variants(n_genes, batch=128, p=0.9, seconds=1.0):
    """ms per forward + weight-gradient of the first Linear layer on one masked view, computed three
    ways: dense (what the method files do), and with the ~90% zeros skipped, as an embedding bag
    over the kept genes (gather) and as a CSR sparse product; each is checked against the dense one."""
    import torch.nn.functional as F
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n_genes)
    keep = torch.rand(batch, n_genes, generator=gen) >= p
    v = x * keep / (1 - p)
    W = torch.randn(common.backbone(n_genes)[0].out_features, n_genes, requires_grad=True)
    Wt = W.detach().t().contiguous().requires_grad_(True)

    def dense():
        return F.linear(v, W)

    def bag():
        rows, cols = keep.nonzero(as_tuple=True)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)[:-1]])
        return F.embedding_bag(cols, Wt, offsets, mode="sum", per_sample_weights=v[rows, cols])

    def csr():
        return torch.sparse.mm(v.to_sparse_csr(), W.t())

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "sparse CSR is in beta" notice
        for name, f in (("dense", dense), ("embedding bag over kept genes", bag), ("CSR sparse product", csr)):
            if not torch.allclose(f(), dense(), atol=1e-3):  # the same product, or the timing means nothing
                raise AssertionError(f"first layer as {name} differs from the dense product")
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                f().sum().backward()
                n += 1
            out[name] = 1e3 * (time.perf_counter() - t0) / n
    return out


def step_variants(n_genes, n_cells=1068, epochs=2, repeats=3):
    """ms per local step of FedSC (the paper's batch 128, one thread) done as fedsc.local_update does
    it, three ways to go faster: both views through each network in one forward pass (BatchNorm
    then normalises over both views at once: a different method detail), bf16 autocast (other
    numbers; fast only on CPUs with bf16 instructions) and torch.compile of each network (its compile
    time is returned apart); and the target EMA as a loop over parameters, as common.ema_ was before
    its one foreach call (the same numbers). The best of `repeats` timings of `epochs` epochs each,
    interleaved."""
    import copy
    torch.set_num_threads(1)
    args = common.parse_args(fedsc.Args, ["--local-epochs", str(epochs), "--out", os.path.join(ROOT, "runs", "speed.csv")])
    torch.manual_seed(0)
    model0, x = fedsc.make_model(n_genes, args), torch.randn(n_cells, n_genes)

    one_pass = copy.copy(args)
    one_pass.one_pass = True  # --one-pass: both views through each network in one forward pass

    def loop_ema(target, online, tau):  # common.ema_ before it became one foreach call
        with torch.no_grad():
            for t, o in zip(target.parameters(), online.parameters()):
                t.lerp_(o, 1 - tau)

    compiled = copy.deepcopy(model0)  # torch.compile: the same modules, compiled once (timed apart)
    t0 = time.perf_counter()
    for key in ("online", "predictor", "target"):
        compiled[key] = torch.compile(compiled[key])
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    variants = {"as fedsc.local_update": {}, "--one-pass (both views in one forward pass)": {"args": one_pass},
                "target EMA as a loop over parameters": {"ema_": loop_ema},
                "bf16 autocast (forward and backward)": {"context": bf16},
                "torch.compile of each network": {"model": compiled}}
    steps = epochs * (n_cells // args.batch_size)
    best = {name: float("inf") for name in variants}

    def step(patch):
        saved = {k: getattr(fedsc if k == "loss_fn" else common, k) for k in patch if k in ("loss_fn", "ema_")}
        for k in saved:
            setattr(fedsc if k == "loss_fn" else common, k, patch[k])
        try:
            client = common.Client(0, x, copy.deepcopy(patch.get("model", model0)), torch.Generator().manual_seed(0))
            t0 = time.perf_counter()
            with patch.get("context", contextlib.nullcontext)():
                fedsc.local_update(client, 0.01, patch.get("args", args))
            return 1e3 * (time.perf_counter() - t0) / steps
        finally:
            for k, f in saved.items():
                setattr(fedsc if k == "loss_fn" else common, k, f)

    step(variants["torch.compile of each network"])  # compiles (a new process compiles again)
    compile_s = time.perf_counter() - t0
    for patch in variants.values():  # warm-up
        step(patch)
    for _ in range(repeats):  # interleaved, so every variant sees the same machine
        for name, patch in variants.items():
            best[name] = min(best[name], step(patch))
    return best, compile_s


def main():
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    a = p.parse_args()
    args1, data = fedsc_setup(a.rounds, 1)
    args2, _ = fedsc_setup(a.rounds, 2)
    seconds_per_round(fedsc_setup(2, 1)[0], data)  # warm-up
    one, two = [], []
    for _ in range(2):  # alternated, so both see the same machine
        one.append(seconds_per_round(args1, data))
        two.append(seconds_per_round(args2, data))
    one, two = sum(one) / 2, sum(two) / 2
    flops = round_flops(args1, data)
    rate1, rate2 = gemm_rate(1), gemm_rate(2)
    layer = first_layer_variants(data.X.shape[1])
    step, compile_s = step_variants(data.X.shape[1])
    tuned = cli.tuned_recipe("FedSC") if os.path.exists(cli.RECIPES) else None
    from torch.profiler import profile, ProfilerActivity
    prof_args, _ = fedsc_setup(max(2, a.rounds // 4), 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds_per_round(prof_args, data)
    events = prof.key_averages()
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL) / 1e6 / prof_args.rounds
    draws = sum(e.self_cpu_time_total for e in events if e.key == "aten::uniform_") / 1e6 / prof_args.rounds
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    summary = [
        f"FedSC on 10X PBMC, paper protocol (4 clients, 5 local epochs, batch 128), {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, `python speed.py --rounds {a.rounds}`; load average while measuring "
        f"{load:.1f} (other processes slow every figure below alike, not their ratios):", "",
        "| measure | value |", "|---|---|",
        f"| seconds per round, `--threads 1` (clients one at a time) | {one:.3f} |",
        f"| seconds per round, `--threads 2` (two clients at once) | {two:.3f} |",
        f"| projected 300 rounds, `--threads 1` / `--threads 2` | {300 * one:.0f} s / {300 * two:.0f} s |",
        f"| matrix-multiply work per round | {flops / 1e9:.1f} GFLOP |",
        f"| fp32 GEMM speed measured here, 1 / 2 threads | {rate1:.0f} / {rate2:.0f} GFLOP/s |",
        f"| GEMM bound per round, 1 / 2 threads | {flops / rate1 / 1e9:.3f} s / {flops / rate2 / 1e9:.3f} s |",
        f"| round time / bound, `--threads 1` / `--threads 2` | {one / (flops / rate1 / 1e9):.2f} / {two / (flops / rate2 / 1e9):.2f} |",
        f"| share of a one-thread round in matrix multiplies (profiled) | {100 * mm / one:.0f}% |",
        f"| the masks' random draws (profiled `aten::uniform_`), per round / x the bound | {draws:.3f} s / {draws / (flops / rate1 / 1e9):.2f} |",
        f"| floor for the same numbers (profiled matrix multiplies + random draws) / bound | {(mm + draws) / (flops / rate1 / 1e9):.2f} |",
    ] + [f"| first layer on a masked view (fwd + weight grad), {name} | {ms:.3f} ms |" for name, ms in layer.items()] + [
        f"| one local step (batch 128, one thread), {name} | {ms:.2f} ms ({ms / step['as fedsc.local_update']:.2f}x) |"
        for name, ms in step.items()] + [
        f"| torch.compile: compile time in a new process (before its first step) | {compile_s:.1f} s |",
        f"| this CPU's vector instructions (torch); bf16 is fast only with AVX512-BF16 or AMX | {torch.backends.cpu.get_cpu_capability()} |"]
    if tuned:
        r, e = tuned["rounds"], tuned["local_epochs"]
        summary.append(f"| projected `--recipe tuned` run ({r} rounds x {e} local epochs), `--threads 1` / `--threads 2` | "
                       f"{one * r * e / args1.local_epochs:.0f} s / {two * r * e / args1.local_epochs:.0f} s |")
    profile_md = ["", "Largest self-time operators, one thread:", "",
                  "| operator | self CPU s per round | calls per round |", "|---|---|---|"] + [
        f"| `{e.key}` | {e.self_cpu_time_total / 1e6 / prof_args.rounds:.3f} | {e.count // prof_args.rounds} |" for e in top]
    md = "\n".join(summary)
    print(md + "\n".join(profile_md))
    benchmark.publish("speed", md + "\n" + "\n".join(profile_md), "speed.py",
                      readme=md + "\n\nOperator profile: `results/speed.md`.")


if __name__ == "__main__":
    main()
