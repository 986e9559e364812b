"""Writes the README's generated blocks that are not results tables:

    python benchmark.py readme reading     the reading order: the functions a student reads to follow
                                           one run of fedsc.py, with their line counts
    python benchmark.py readme firstrun    runs the README's first command, and writes its wall time,
                                           the machine's load and its `final` line
"""
import ast
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
FIRST_RUN = ["python", "fedsc.py", "--recipe", "tuned"]
# One run of fedsc.py, in the order it happens: the method file, then the helpers it calls.
READING = [
    ("fedsc.py", None, "the method: networks, loss, local update, upload, aggregate, download"),
    ("common.py", ["setup", "load"], "check the options, read and preprocess the cells, split them over clients"),
    ("data.py", ["read_counts", "preprocess", "partition"], "reading, preprocessing, the non-IID partition"),
    ("common.py", ["backbone", "Encoder", "two_views"], "the encoder f, g(f(x)) and random masking"),
    ("common.py", ["Client", "make_client", "learning_rate", "batches", "weights", "ema_"], "a client's private state"),
    ("common.py", ["fedavg", "federate"], "the server's average; the rounds"),
    ("common.py", ["embed", "cluster_metrics", "finish"], "the global encoder's embedding, KMeans, the metrics"),
]
LIMIT = 600


def spans(path):
    """{top-level function or class name: (first line incl. decorators, number of lines)}"""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out[node.name] = (first, node.end_lineno - first + 1)
    return out


def reading():
    """The reading order as markdown, and its total line count."""
    lines, total = ["| file | read | lines | what |", "|---|---|---|---|"], 0
    for path, names, what in READING:
        if names is None:
            n = sum(1 for _ in open(os.path.join(ROOT, path)))
            lines.append(f"| `{path}` | all of it | {n} | {what} |")
        else:
            s = spans(path)
            n = sum(s[k][1] for k in names)
            lines.append(f"| `{path}` | " + ", ".join(f"`{k}` (line {s[k][0]})" for k in names) + f" | {n} | {what} |")
        total += n
    helpers = sum(sum(1 for _ in open(os.path.join(ROOT, f))) for f in ("common.py", "data.py"))
    lines.append(f"\nIn all {total} lines (at most {LIMIT}); `common.py` and `data.py` are {helpers} lines together. "
                 "Options and checks live in `cli.py`, a run's files and provenance in `runs.py`, every step kept at "
                 "the sites in `federated.py`, file formats in `formats.py`: none is needed to follow a run.")
    return "\n".join(lines), total


def firstrun():
    """Run the README's first command as a user would (every core, default options) and report it."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.time()
    p = subprocess.run([sys.executable] + FIRST_RUN[1:], cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    final = next((l for l in p.stdout.splitlines() if l.startswith("final")), None)
    if p.returncode or final is None:
        sys.exit(f"error: `{' '.join(FIRST_RUN)}` failed (exit {p.returncode}): {p.stderr.strip()[-300:]}")
    final = re.sub(r"  time [\d.]+s$", "", final)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"```bash\n{' '.join(FIRST_RUN)}\n```\n\nIt took {wall:.0f} s of wall time on {cores} cores "
            f"(load average {load:.2f} before it started) and ended with\n\n```\n{final}\n```")


def main(argv):
    import benchmark
    which = argv or ["reading"]
    if "reading" in which:
        md, total = reading()
        benchmark.readme_block("reading", md, "readme.py (python benchmark.py readme reading)")
        if total > LIMIT:
            print(f"warning: the reading order is {total} lines, more than {LIMIT}", flush=True)
    if "firstrun" in which:
        benchmark.readme_block("firstrun", firstrun(), "readme.py (python benchmark.py readme firstrun)")
    return 0
