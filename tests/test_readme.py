"""The class-sized shape: a short README whose generated blocks are current, a reading path and
helpers within their line budgets, and a default experiment that is the class table."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import benchmark  # noqa: E402
import readme  # noqa: E402


def block(name):
    text = open(os.path.join(ROOT, "README.md")).read()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    return text[text.index(start) + len(start):text.index(end)]


def test_readme_is_short_and_its_reading_order_is_current_and_within_budget():
    assert sum(1 for _ in open(os.path.join(ROOT, "README.md"))) <= 200
    md, total = readme.reading()
    assert md in block("reading"), "the README's reading order is stale: python benchmark.py readme reading"
    assert total <= readme.LIMIT
    helpers = sum(sum(1 for _ in open(os.path.join(ROOT, f))) for f in ("common.py", "data.py"))
    assert helpers <= 1100
    # every function the reading order names exists where it says
    for path, names, _ in readme.READING:
        if names:
            assert set(names) <= set(readme.spans(path)), path


def test_the_default_experiment_is_the_class_table_and_shares_table1s_runs():
    runs = benchmark.plan("class", [0, 1, 2])
    rows = len(benchmark.FED) + len(benchmark.CLASS_MECH) + len(benchmark.CLASS_REFS)
    assert len(runs) == rows * len(benchmark.T1_DATASETS) * 3 and len(benchmark.CLASS_MECH) == 2
    assert not any("paper" in argv for _, _, argv, _ in runs)  # no 300-round run in the class table
    shared = {(script, tuple(argv), s) for exp in ("table1", "anchor") for _, script, argv, s in benchmark.plan(exp, [0, 1, 2])}
    assert all((script, tuple(argv), s) in shared for _, script, argv, s in runs)  # no run of its own
    assert "class" in benchmark.SHARED_ROWS["table1"] and {"table1", "anchor"} <= set(benchmark.SHARED_ROWS["class"])
    assert benchmark.GROUPS["paper"] == ["table1", "table2", "table3", "fig3"]
    # Table 2's tuned column: the full model's run is Table 1's tuned FedBYOL run, the ablations its own
    t2 = {(script, tuple(argv)) for _, script, argv, _ in benchmark.plan("table2", [0]) if "tuned" in argv}
    t1 = {(script, tuple(argv)) for _, script, argv, _ in benchmark.plan("table1", [0])}
    assert len(t2) == len(benchmark.T2_ROWS) and len(t2 & t1) == 1 and "table1" in benchmark.SHARED_ROWS["table2"]


def test_plan_cost_scales_finished_rows_by_the_schedule():
    import types
    import pandas as pd
    known = pd.DataFrame({"method": ["FedSC", "FedSC", "PCA"], "data": ["10X_PBMC"] * 3, "rounds": [50, 50, None],
                          "local_epochs": [5, 5, None], "seconds": [100.0, 120.0, 4.0], "baseline": ["", "", "pca"]})
    paper = types.SimpleNamespace(method="FedSC", data="10X_PBMC", rounds=300, local_epochs=5)
    assert abs(benchmark.run_cost("fedsc.py", paper, known) - 110.0 * 6) < 1e-9  # the median per unit of work
    pca = types.SimpleNamespace(method="PCA", data="10X_PBMC", baseline="pca")
    assert benchmark.run_cost("centralized.py", pca, known) == 4.0
    other = types.SimpleNamespace(method="FedSC", data="mouse_bladder", rounds=300, local_epochs=5)
    assert benchmark.run_cost("fedsc.py", other, known) != benchmark.run_cost("fedsc.py", other, known)  # NaN: unknown
