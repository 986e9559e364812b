"""The results files (rows, the collapse signal) and the benchmark driver: tuned recipes and the
tuning grid, the results cache (a row is reused only for the same arguments, data and code), the
tables and what gets published; speed.py's first-layer variants."""
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import cli
import common
import federated
import runs
import data as D
from helpers import ROOT, TINY, parse


# ---------------------------------------------------------------------------------------------
# Results files
# ---------------------------------------------------------------------------------------------
def test_append_row_keeps_every_row(tmp_path):
    path = str(tmp_path / "r.csv")
    runs.append_row(path, {"a": 1, "b": 2})
    runs.append_row(path, {"a": 3, "c": 4})
    r = pd.read_csv(path)
    assert r["a"].tolist() == [1, 3] and list(r.columns) == ["a", "b", "c"]
    runs.append_row(path, {"a": 5, "config_id": "012345678901", "commit": "1234e56"})
    r = pd.read_csv(path, dtype=runs.TEXT_COLUMNS)
    assert r["config_id"].iloc[-1] == "012345678901" and r["commit"].iloc[-1] == "1234e56"  # hashes stay text
    assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.csv.lock"]  # no temporary file left


def test_collapse_signal():
    rng = np.random.default_rng(0)
    line = np.outer(rng.normal(size=500), rng.normal(size=60)) + 1e-6 * rng.normal(size=(500, 60))
    spread = rng.normal(size=(500, 60))
    assert common.effective_rank(line) < 1.1 and common.collapsed(line, common.effective_rank(line))
    assert common.effective_rank(spread) > 45 and not common.collapsed(spread, common.effective_rank(spread))
    assert not common.collapsed(line[:, :2], 1.0)  # a 2-d embedding (PCA-raw) is not judged
    s = np.linalg.svd(spread - spread.mean(0), compute_uv=False)  # against the SVD definition
    assert common.effective_rank(spread) == pytest.approx(np.exp(-(s / s.sum() * np.log(s / s.sum())).sum()))
    merged = federated.merge_scatter([federated.site_scatter(spread[a:b]) for a, b in ((0, 30), (30, 310), (310, 500))])
    assert federated.rank_from_scatter(merged[2]) == pytest.approx(common.effective_rank(spread))  # sites merge exactly


# ---------------------------------------------------------------------------------------------
# Recipes and the tuning grid
# ---------------------------------------------------------------------------------------------
def test_recipe_tuned_reads_recipes_and_explicit_flags_win(tmp_path, monkeypatch):
    path = tmp_path / "recipes.json"
    path.write_text('{"recipes": {"FedSC": {"lr": 0.25, "rounds": 77, "local_epochs": 3}}}')
    monkeypatch.setattr(cli, "RECIPES", str(path))
    a = parse("fedsc", ["--recipe", "tuned"])
    assert (a.lr, a.rounds, a.local_epochs) == (0.25, 77, 3)
    a = parse("fedsc", ["--recipe", "tuned", "--rounds", "5"])
    assert (a.lr, a.rounds) == (0.25, 5)
    assert parse("fedsc", []).lr == 0.032  # the paper's recipe is the default
    with pytest.raises(D.DataError, match="no tuned recipe for FedBYOL"):
        parse("fedbyol", ["--recipe", "tuned"])


def test_tune_grid_axis_flags_and_choice(monkeypatch, tmp_path):
    """The tuning grid's per-method axis (predictor or temperature): its first value is the paper's
    (no flag, so those runs are the two-axis grid's), its second changes exactly that option; every
    method gets the same number of runs; recipes.json takes the best mean ARI over all four axes and
    agrees with the tuning table's choice."""
    import benchmark
    counts = {}
    for _, script, argv, _ in benchmark.plan("tune", [0]):
        counts[script] = counts.get(script, 0) + 1
    per_label = {label: (36 if script != "fedmoco.py" else 72) for label, script, _ in benchmark.FED}
    assert {s: n for s, n in counts.items()} == {script: per_label[label] for label, script, _ in benchmark.FED}
    for label, script, extra in benchmark.FED:
        name, (paper, other) = benchmark.TUNE_AXIS[label]
        base = benchmark.tune_argv(label, extra, 0.3, 50, 5)
        assert benchmark.tune_argv(label, extra, 0.3, 50, 5, paper) == base
        a, b = parse(script[:-3], base), parse(script[:-3], benchmark.tune_argv(label, extra, 0.3, 50, 5, other))
        assert getattr(a, name) == paper and getattr(b, name) == other
        assert {k for k in vars(a) if vars(a)[k] != vars(b)[k]} == {name}
    # a synthetic grid: one point (an axis value, lr 0.3, 25 x 5) is best with recomputed statistics
    target = {"FedSC": ["--predictor", "mlp", "--lr", "0.3", "--rounds", "25"],
              "FedSimCLR": ["--temperature", "0.5", "--lr", "0.3", "--rounds", "25"]}

    def fake_rows(df, script, argv, seeds, overrides, missing):
        label = next(l for l, s, e in benchmark.FED if s == script and all(x in argv for x in e))
        hit = label in target and all(" ".join(target[label][i:i + 2]) in " ".join(argv) for i in (0, 2, 4))
        return pd.DataFrame({"ari": [70.0 if hit else 40.0] * len(seeds), "bn_running_ari": [50.0] * len(seeds)})
    monkeypatch.setattr(benchmark, "rows_for", fake_rows)
    monkeypatch.setattr(cli, "RECIPES", str(tmp_path / "recipes.json"))
    benchmark.write_recipes(pd.DataFrame(), [0, 1, 2])
    chosen = json.load(open(tmp_path / "recipes.json"))["recipes"]
    assert chosen["FedSC"] == dict(lr=0.3, rounds=25, local_epochs=5, bn_stats="recompute", predictor="mlp",
                                   mu_rule="relative")
    assert chosen["FedSimCLR"] == dict(lr=0.3, rounds=25, local_epochs=5, bn_stats="recompute", temperature=0.5)
    assert chosen["FedBYOL"] == dict(lr=0.1, rounds=25, local_epochs=5, bn_stats="running", predictor="linear")
    table = benchmark.tune_table(pd.DataFrame(), [0, 1, 2], [], benchmark.Missing())
    assert "| lr 0.3, 25 x 5, predictor mlp, recompute |" in table
    assert "| lr 0.3, 25 x 5, temperature 0.5, recompute |" in table
    assert "| lr 0.1, 25 x 5, predictor linear, running |" in table
    fedsc_lines = [l for l in table.splitlines() if "predictor mlp | recompute" in l]
    assert "**70.00 ± 0.00**" in fedsc_lines[2]  # FedSimSiam, FedBYOL, then FedSC: its own best in bold


# ---------------------------------------------------------------------------------------------
# The results cache, the tables, publishing
# ---------------------------------------------------------------------------------------------
def test_benchmark_reruns_only_rows_whose_code_changed(synth, tmp_path, monkeypatch, capsys):
    import benchmark
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in os.listdir(ROOT):
        if f.endswith(".py"):
            (repo / f).write_text(open(os.path.join(ROOT, f)).read())
    res = str(tmp_path / "results")
    monkeypatch.setattr(benchmark, "ROOT", str(repo))
    monkeypatch.setattr(benchmark, "plan", lambda exp, seeds: [
        (name, f"{name}.py", ["--data", synth, "--clients", "2", "--types-per-client", "2"] + TINY, s)
        for name in ("fedsimclr", "fedsimsiam") for s in seeds])
    assert benchmark.execute(["table3"], [0, 1], 2, res, []) == 0
    assert len(pd.read_csv(os.path.join(res, "table3.csv"))) == 4
    assert benchmark.execute(["table3"], [0, 1], 2, res, []) == 0  # everything cached
    assert "table3: 0 runs to do, 4 already have a row" in capsys.readouterr().out
    with open(repo / "fedsimclr.py", "a") as f:
        f.write("# a one-line change\n")
    assert benchmark.execute(["table3"], [0, 1], 2, res, []) == 0
    out = capsys.readouterr().out
    assert "table3: 2 runs to do, 2 already have a row" in out and "fedsimsiam.py" not in out.split("runs to do")[1]
    r = pd.read_csv(os.path.join(res, "table3.csv"), dtype=runs.TEXT_COLUMNS)  # a hash may look like a number
    assert len(r) == 6 and r.groupby("method")["code"].nunique().to_dict() == {"FedSimCLR": 2, "FedSimSiam": 1}
    assert len(os.listdir(os.path.join(res, "logs", "table3"))) == 6  # no log overwritten
    assert benchmark.execute(["table2"], [0], 2, res, []) == 0  # another experiment runs its own rows
    assert "table2: 2 runs to do, 0 already have a row" in capsys.readouterr().out
    # tables use the current code's rows only, and never ad-hoc runs
    pd.concat([r, r]).to_csv(os.path.join(res, "runs.csv"), index=False)
    assert len(benchmark.all_rows(res)) == 6 + 2  # table3's and table2's rows, not runs.csv's
    got = benchmark.rows_for(benchmark.all_rows(res), "fedsimclr.py", ["--data", synth, "--clients", "2",
                             "--types-per-client", "2"] + TINY, [0, 1], [], benchmark.Missing())
    assert len(got) == 2 and set(got["code"]) == {runs.code_hash(str(repo / "fedsimclr.py"))}
    # --match: only the runs whose command holds every text given
    assert benchmark.execute(["table3"], [2], 2, res, [], match=["fedsimsiam.py", "--types-per-client 2"]) == 0
    assert "table3: 1 runs to do, 0 already have a row" in capsys.readouterr().out
    assert benchmark.execute(["table3"], [2], 2, res, [], match=["fedsimclr.py", "--recipe tuned"]) == 0
    assert "table3: 0 runs to do, 0 already have a row" in capsys.readouterr().out
    # --plan: the runs without a row; --from-scratch: all; a run whose row another experiment reads counts once
    benchmark.estimate(["table3", "table2"], [0, 1], 2, res, [])
    out = capsys.readouterr().out
    assert "table3: 0 runs to do" in out and "table2: 2 runs to do" in out
    benchmark.estimate(["table3", "table2"], [0, 1], 2, res, [], scratch=True)
    assert "table3: 4 runs to do" in (out := capsys.readouterr().out) and "table2: 4 runs to do" in out
    monkeypatch.setitem(benchmark.SHARED_ROWS, "table2", ["table3"])
    benchmark.estimate(["table3", "table2"], [0, 1], 2, res, [], scratch=True)
    assert "table3: 4 runs to do" in (out := capsys.readouterr().out) and "table2: 0 runs to do" in out


def test_plan_costs_a_run_from_finished_one_thread_rows():
    """seconds per round x local epoch of the same method and data: median, and fastest; rows with
    two threads or a diverged run do not count."""
    import types
    import benchmark
    known = pd.DataFrame({"method": ["FedX"] * 5 + ["FedY"], "data": ["d"] * 6, "rounds": [10, 20, 10, 10, 10, 10],
                          "local_epochs": [1] * 6, "seconds": [10.0, 60.0, 1.0, 0.5, 99.0, 0.1],
                          "threads": [1, 1, 2, 1, 1, 1], "status": ["ok", "ok", "ok", "diverged", "ok", "ok"]})
    args = types.SimpleNamespace(method="FedX", data="d", rounds=5, local_epochs=2)
    per = np.array([10 / 10, 60 / 20, 99 / 10])  # the one-thread, not diverged FedX rows
    assert np.isclose(benchmark.run_cost("fedx.py", args, known), np.median(per) * 10)
    assert np.isclose(benchmark.run_cost("fedx.py", args, known, q=0.0), per.min() * 10)
    assert np.isnan(benchmark.run_cost("fedx.py", types.SimpleNamespace(method="FedZ", data="d", rounds=1, local_epochs=1), known))


def test_partial_tables_are_printed_not_published(synth, tmp_path, monkeypatch):
    import benchmark
    res = str(tmp_path / "results")
    monkeypatch.setattr(benchmark, "plan", lambda exp, seeds: [
        ("FedSC", "fedsc.py", ["--data", synth, "--clients", "2", "--types-per-client", "2"] + TINY, s) for s in seeds])
    monkeypatch.setattr(benchmark, "build", lambda exp, df, seeds, overrides, results: (
        "table", benchmark.Missing([("fedsc.py", s) for s in seeds if s not in set(df.get("seed", []))])))
    assert benchmark.execute(["table3"], [0], 1, res, []) == 0
    assert benchmark.write_tables(["table3"], [0, 1], res, [], publish=True) == {}  # seed 1 is missing
    assert not os.path.exists(os.path.join(res, "table3.md"))
    done = benchmark.write_tables(["table3"], [0], res, [], publish=True)
    assert "table3" in done and os.path.exists(os.path.join(res, "table3.md"))
    assert f"`{runs.git_commit()}`" in done["table3"][1]  # provenance names the rows' commit


def one_method_benchmark(benchmark, monkeypatch, synth):
    """The benchmark shrunk to FedSimCLR with tiny settings on the synthetic file, no reference rows."""
    monkeypatch.setattr(benchmark, "T1_DATASETS", [synth])
    monkeypatch.setattr(benchmark, "DATASETS", [synth])
    monkeypatch.setattr(benchmark, "SHORT", {synth: "synth"})
    monkeypatch.setattr(benchmark, "FED", [("FedSimCLR", "fedsimclr.py", ["--clients", "2", "--types-per-client", "2"] + TINY)])
    monkeypatch.setattr(benchmark, "CENTRAL", [])
    monkeypatch.setattr(benchmark, "FED_EXACT", [])
    monkeypatch.setattr(benchmark, "CLASS_REFS", [])


def test_table1_is_published_with_only_its_paper_rows_pending(synth, tmp_path, monkeypatch):
    """Table 1 goes out when only --recipe paper runs are missing: their rows read pending with no
    mean of the seeds that are in, and the note counts them; a missing tuned run, or no tuned
    recipe at all, keeps it out, and a table that is no longer complete loses its .md."""
    import benchmark
    res = str(tmp_path / "results")
    one_method_benchmark(benchmark, monkeypatch, synth)
    assert benchmark.execute(["table1"], [0], 1, res, []) == 0  # seed 0 of the tuned and the paper row
    rows = pd.read_csv(os.path.join(res, "table1.csv"))
    assert sorted(rows["recipe"]) == ["paper", "tuned"]
    paper_ari = f"{rows.loc[rows.recipe == 'paper', 'ari'].iloc[0]:.2f}"
    assert benchmark.write_tables(["table1"], [0, 1], res, [], publish=True) == {}  # tuned seed 1 is missing
    assert benchmark.execute(["table1"], [0, 1], 1, res, [], match=["--recipe tuned"]) == 0
    done = benchmark.write_tables(["table1"], [0, 1], res, [], publish=True)
    md, note = done["table1"]
    paper_line = next(line for line in md.splitlines() if "| paper: " in line)
    assert "pending (1 of 2 seeds)" in paper_line and paper_ari not in paper_line
    tuned_line = next(line for line in md.splitlines() if "| tuned: " in line)
    assert " ± " in tuned_line and "pending" not in tuned_line
    assert "Pending: 1 run with `--recipe paper`" in note and os.path.exists(os.path.join(res, "table1.md"))
    monkeypatch.setattr(benchmark, "recipes", lambda: ("paper",))  # no recipes.json: nothing but pending rows
    assert benchmark.write_tables(["table1"], [0, 1], res, [], publish=True) == {}
    assert not os.path.exists(os.path.join(res, "table1.md"))  # the stale table is gone


def test_split_reuses_table1_runs_and_its_gaps_are_the_differences(synth, tmp_path, monkeypatch, capsys):
    """The split experiment runs only the IID and one-client runs: its non-IID column is Table 1's
    tuned run (same arguments, data and code), and its gap columns are differences of its ARI cells."""
    import benchmark
    res = str(tmp_path / "results")
    one_method_benchmark(benchmark, monkeypatch, synth)
    assert benchmark.execute(["table1"], [0], 1, res, [], match=["--recipe tuned"]) == 0
    capsys.readouterr()
    assert benchmark.execute(["split"], [0], 2, res, []) == 0
    assert "split: 2 runs to do, 1 already have a row" in capsys.readouterr().out
    t1, sp_ = pd.read_csv(os.path.join(res, "table1.csv")), pd.read_csv(os.path.join(res, "split.csv"))
    assert len(t1) == 1 and len(sp_) == 2 and sorted(sp_["clients"]) == [1, 2]
    assert (sp_["partition"] == "iid").all() and t1["partition"].iloc[0] == "class"
    done = benchmark.write_tables(["split"], [0], res, [], publish=True)
    line = next(l for l in done["split"][0].splitlines() if l.startswith("| FedSimCLR"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    non_iid, iid = t1["ari"].iloc[0], sp_.loc[sp_.clients == 2, "ari"].iloc[0]
    one = sp_.loc[sp_.clients == 1, "ari"].iloc[0]
    assert cells[2:5] == [f"{non_iid:.2f}", f"{iid:.2f}", f"{one:.2f}"]
    assert cells[5:7] == [f"{one - iid:+.2f}", f"{iid - non_iid:+.2f}"]
    assert os.path.exists(os.path.join(res, "split.md"))


def test_publish_writes_the_results_file_and_only_its_readme_block(tmp_path, monkeypatch):
    benchmark = importlib.import_module("benchmark")
    (tmp_path / "README.md").write_text("intro\n<!-- x:start -->\nold\n<!-- x:end -->\nmid\n<!-- y:start -->\nkeep\n<!-- y:end -->\n")
    monkeypatch.setattr(benchmark, "ROOT", str(tmp_path))
    benchmark.publish("x", "| new |", "a test", readme="| new | (short) |")
    text = (tmp_path / "README.md").read_text()
    assert "old" not in text and "| new | (short) |" in text and "keep" in text and text.startswith("intro\n")
    assert "written by a test" in text
    assert (tmp_path / "results" / "x.md").read_text() == "| new |\n"


def test_speed_first_layer_variants_compute_the_same_product():
    """speed.py times the masked first layer three ways; it refuses to time a variant whose
    product differs from the dense one."""
    speed = importlib.import_module("speed")
    ms = speed.first_layer_variants(30, batch=16, seconds=0.01)
    assert set(ms) == {"dense", "embedding bag over kept genes", "CSR sparse product"} and min(ms.values()) > 0


def test_map_figure_projects_on_the_top_two_components_and_draws(tmp_path):
    """figures.py (python benchmark.py map): pca2 is the embedding's PCA-2 up to sign; draw writes
    the PNG from run folders as the method files write them (embedding.npy, clusters.csv)."""
    import figures
    from sklearn.decomposition import PCA
    rng = np.random.default_rng(0)
    h = rng.normal(size=(200, 6)) * np.array([5, 3, 1, 1, 1, 1])
    ref = PCA(2).fit_transform(h)
    xy = figures.pca2(h)
    np.testing.assert_allclose(np.abs(xy), np.abs(ref), atol=1e-8)
    pytest.importorskip("matplotlib")
    folder = tmp_path / "run"
    folder.mkdir()
    np.save(folder / "embedding.npy", h)
    pd.DataFrame({"cell": range(200), "client": rng.integers(0, 4, 200), "label": 0,
                  "label_name": rng.choice(["B", "T"], 200), "cluster": 0}).to_csv(folder / "clusters.csv", index=False)
    figures.draw([("a", str(folder), 50.0), ("b", str(folder), 60.0)], str(tmp_path / "map.png"))
    assert (tmp_path / "map.png").stat().st_size > 10000


def test_benchmark_refuses_bad_options_in_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    for argv, expect in ((["--seeds", "0", "-1", "--plan"], "--seeds must be in [0, 2^32), got 0 -1"),
                         (["--results", str(tmp_path / "afile"), "--plan"], "is a file; give the folder"),
                         (["--from-scratch"], "--from-scratch goes with --plan"),
                         (["--jobs", "0"], "--jobs must be at least 1"), (["nosuch"], "unknown experiment 'nosuch'")):
        p = subprocess.run([sys.executable, "benchmark.py"] + argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and p.stderr.startswith("error: "), (argv, p.stderr)
        assert expect in p.stderr
