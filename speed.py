"""Where the time of a FedSC run goes, and 1 vs 2 torch threads.

    python speed.py [--rounds 20]

Runs FedSC on 10X PBMC for a few rounds of the paper's protocol with 1 and with 2 threads (seconds
per round, same process, so the ratio is fair), profiles one-thread rounds with torch.profiler to
split the time into matrix multiplies (addmm/mm/bmm) and everything else, and reads the wall time
of the full-protocol runs from results/table1.csv. Writes results/speed.md and the README block.
"""
import argparse
import contextlib
import io
import os
import time

import pandas as pd
import torch

import common
import fedsc

ROOT = os.path.dirname(os.path.abspath(__file__))
MATMUL = {"aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"}


def fedsc_rounds(rounds, threads, seed=0):
    args = common.parse_args(fedsc.Args, ["--rounds", str(rounds), "--threads", str(threads), "--seed", str(seed)])
    with contextlib.redirect_stdout(io.StringIO()):
        data = common.setup(args, "FedSC")
        model = fedsc.make_model(data.X.shape[1], args)
        t0 = time.perf_counter()
        common.federate(args, data, model, fedsc.UPLOAD, fedsc.download, fedsc.loss_fn, fedsc.trainable,
                        fedsc.after_step)
    return (time.perf_counter() - t0) / rounds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    a = p.parse_args()
    fedsc_rounds(2, 1)  # warm-up
    first = fedsc_rounds(a.rounds, 1)
    two = fedsc_rounds(a.rounds, 2)
    one_mean = (first + fedsc_rounds(a.rounds, 1)) / 2  # 1 thread before and after 2 threads
    torch.set_num_threads(1)
    from torch.profiler import profile, ProfilerActivity
    prof_rounds = max(2, a.rounds // 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fedsc_rounds(prof_rounds, 1)
    events = prof.key_averages()
    # matmul time as the profiler measures it, over the same rounds' unprofiled wall time
    # (the profiler's own overhead would otherwise count as "outside")
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL) / 1e6 / prof_rounds
    wall = one_mean
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]

    rows = pd.read_csv(os.path.join(ROOT, "results", "table1.csv")) if os.path.exists(
        os.path.join(ROOT, "results", "table1.csv")) else pd.DataFrame()
    full = rows[(rows.get("method") == "FedSC") & (rows.get("data") == "10X_PBMC")] if len(rows) else rows
    lines = [
        f"FedSC on 10X PBMC, paper protocol (4 clients, 5 local epochs, batch 128, 160 local steps per round), "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}:",
        "",
        "| measure | value |", "|---|---|",
        f"| seconds per round, 1 thread (mean of two {a.rounds}-round runs) | {one_mean:.3f} |",
        f"| seconds per round, 2 threads | {two:.3f} |",
        f"| 2 threads / 1 thread time ratio | {two / one_mean:.2f} |",
        f"| projected 300 rounds, 1 thread | {300 * one_mean / 60:.1f} min |",
    ]
    if len(full):
        lines.append(f"| full 300-round runs in results/table1.csv (incl. data loading and KMeans; "
                     f"2 runs in parallel) | {full['seconds'].mean():.0f} s mean over {len(full)} runs |")
    lines += [
        f"| matrix multiplies (addmm/mm, profiled) per round, 1 thread | {mm:.3f} s |",
        f"| share of the round in matrix multiplies | {100 * mm / wall:.0f}% |",
        f"| share outside the matrix multiplies (other kernels, autograd, optimizer, Python) | {100 * (1 - mm / wall):.0f}% |",
        "", "Largest self-time operators in the profile:", "",
        "| operator | self CPU s | calls |", "|---|---|---|",
    ] + [f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | {e.count} |" for e in top]
    md = "\n".join(lines)
    print(md)
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    with open(os.path.join(ROOT, "results", "speed.md"), "w") as f:
        f.write(md + "\n")
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    s, e = "<!-- speed:start -->", "<!-- speed:end -->"
    if s in text and e in text:
        block = f"{s}\n<!-- written by speed.py; do not edit by hand -->\n\n{md}\n{e}"
        open(readme, "w").write(text[:text.index(s)] + block + text[text.index(e) + len(e):])


if __name__ == "__main__":
    main()
