"""The verified re-stamp (python benchmark.py rehash): a refactor keeps the rows, a change of
behaviour is refused and named. Runs on a copy of the repository in a temporary git repo."""
import os
import re
import shutil
import subprocess
import sys

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data as D  # noqa: E402
import formats  # noqa: E402
import runs  # noqa: E402


def sh(*a, cwd):
    return subprocess.run(list(a), cwd=cwd, capture_output=True, text=True)


def commit(repo, msg):
    sh("git", "add", "-A", cwd=repo)
    assert sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", msg, cwd=repo).returncode == 0
    return sh("git", "rev-parse", "--short", "HEAD", cwd=repo).stdout.strip()


def test_rehash_restamps_a_refactor_and_refuses_a_behaviour_change(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in os.listdir(ROOT):
        if f.endswith(".py") or f == "recipes.json":
            shutil.copy(os.path.join(ROOT, f), repo / f)
    sh("git", "init", "-q", cwd=repo)
    a = commit(repo, "A")
    X, y = D.synthetic_counts(n_cells=120, n_genes=60, seed=1)
    syn = formats.write_h5(str(tmp_path / "syn.h5"), X, Y=y)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = repo / "results" / "t.csv"
    p = subprocess.run([sys.executable, "fedsimclr.py", "--data", syn, "--rounds", "2", "--local-epochs", "1",
                        "--threads", "1", "--out", str(out)], cwd=repo, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "fedsimsiam.py", "--data", syn, "--rounds", "2", "--local-epochs", "1",
                        "--threads", "1", "--out", str(out)], cwd=repo, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    row = pd.read_csv(out, dtype=str).iloc[0]
    assert row["commit"] == a and row["code"] == runs.code_hash(str(repo / "fedsimclr.py"))
    old_code = row["code"]

    # a refactor: a comment and a function moved to the end of common.py -> re-stamped
    src = (repo / "common.py").read_text()
    start = src.index("def weights(module):")
    end = src.index("\n\n\n", start)
    moved = src[start:end]
    (repo / "common.py").write_text("# a comment\n" + src[:start] + src[end + 3:] + "\n\n" + moved + "\n")
    cli = (repo / "cli.py").read_text()  # and a new option whose default is the old behaviour
    at = cli.index('    evaluate: typing.Literal["pooled"')
    (repo / "cli.py").write_text(cli[:at] + '    new_knob: int = 7\n    """a new option"""\n' + cli[at:])
    b = commit(repo, "B: refactor")
    assert runs.code_hash(str(repo / "fedsimclr.py")) != old_code
    p = subprocess.run([sys.executable, "benchmark.py", "rehash", "--suite", "quick", "--jobs", "1"], cwd=repo, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 rows re-stamped" in p.stdout
    assert pd.read_csv(out, dtype=str)["new_knob"].tolist() == ["7", "7"]  # every script's rows get its default
    row = pd.read_csv(out, dtype=str).iloc[0]
    assert row["code"] == runs.code_hash(str(repo / "fedsimclr.py"))
    assert row["rehash_verified"] == a and row["code_commit"] == b and row["commit"] == a  # the run's own commit stays

    # a change of behaviour: the mask scale -> refused, the row untouched, the moved fingerprint named
    src = (repo / "common.py").read_text()
    assert "v1, v2 = x * keep / (1 - p)" in src
    (repo / "common.py").write_text(src.replace("v1, v2 = x * keep / (1 - p)", "v1, v2 = x * keep / (1 - p) * 1.01"))
    commit(repo, "C: behaviour")
    before = out.read_bytes()
    p = subprocess.run([sys.executable, "benchmark.py", "rehash", "--suite", "quick", "--jobs", "1"], cwd=repo, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 1, p.stdout + p.stderr
    assert re.search(r"fingerprint fedsimclr moved: [^\n]*embedding\.npy", p.stdout), p.stdout
    assert "refused for fedsimclr.py" in p.stdout
    assert out.read_bytes() == before
