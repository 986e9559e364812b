"""Saving a run: an interrupt at any point of runs.save_run leaves a whole run (its folder and its
row) or nothing; Ctrl-C and SIGTERM end a script with one `interrupted:` line and exit code 130."""
import importlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import common  # noqa: E402
import data as D  # noqa: E402
import formats  # noqa: E402
import runs  # noqa: E402


def finished_run(tmp):
    """What save_run gets at the end of a two-site run: arguments, data, log, metrics, embedding."""
    X, y = D.synthetic_counts(n_cells=40, n_genes=12, n_types=2, seed=0)
    sites = [formats.write_h5(str(tmp / f"site{k}.h5"), X[k::2], Y=y[k::2]) for k in range(2)]
    args = common.parse_args(importlib.import_module("fedsc").Args, ["--sites", *sites, "--out", str(tmp / "o" / "r.csv")])
    cli.check_args(args)
    data = D.Data(X.astype(np.float32), y, [np.arange(20), np.arange(20, 40)], 2, np.arange(40),
                  np.array(["a", "b"]), np.array([f"c{i}" for i in range(40)]), np.arange(12))
    h = np.random.default_rng(0).normal(size=(40, 6))
    log = [{"round": 1, "client": k, "lr": 0.1, "loss": 1.0, "mu": 0.5} for k in range(2)]
    return args, data, log, {"erank": 5.0, "ari": 50.0}, h, np.arange(40) % 2


def saved(out):
    """(run folders, every other entry of runs/, the rows' run names)."""
    folder = os.path.join(os.path.dirname(out), "runs")
    entries = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    rows = list(pd.read_csv(out)["run"]) if os.path.exists(out) else []
    return [e for e in entries if not e.startswith(".")], [e for e in entries if e.startswith(".")], rows


def whole_or_nothing(out):
    folders, hidden, rows = saved(out)
    assert hidden == [] and not [f for f in os.listdir(os.path.dirname(out)) if f.endswith(".tmp")]
    assert folders == rows, (folders, rows)  # the folder and its row, or neither
    if folders:
        assert len(os.listdir(os.path.join(os.path.dirname(out), "runs", folders[0]))) == 6
    return bool(folders)


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupt_at_every_write_leaves_a_whole_run_or_nothing(when, tmp_path, monkeypatch):
    """KeyboardInterrupt at the k-th file write, for every k: before the write starts, or once the
    file is in place (the moment after its rename)."""
    args, data, log, metrics, h, pred = finished_run(tmp_path)
    real, calls = formats.write_atomic, []
    monkeypatch.setattr(formats, "write_atomic", lambda path, write: (calls.append(path), real(path, write)))
    runs.save_run(args, data, log, "ok", dict(metrics), h, pred)
    n = len(calls)
    assert n == 7  # embedding, clusters, rounds, two sites' .h5ad, result.json, the results CSV
    landed = []
    for k in range(1, n + 1):
        args.out = str(tmp_path / f"{when}{k}" / "r.csv")
        count = []

        def interrupted(path, write):
            count.append(path)
            if len(count) == k and when == "before":
                raise KeyboardInterrupt
            real(path, write)
            if len(count) == k:
                raise KeyboardInterrupt

        monkeypatch.setattr(formats, "write_atomic", interrupted)
        runs.saved = None
        with pytest.raises(KeyboardInterrupt):
            runs.save_run(args, data, log, "ok", dict(metrics), h, pred)
        landed.append(whole_or_nothing(args.out))
        assert (runs.saved is not None) == landed[-1]
    # only a row already in place means a saved run: the CSV's own write, once it is renamed
    assert landed == [False] * (n - 1) + [when == "after"]


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupt_around_the_row_keeps_folder_and_row_together(when, tmp_path, monkeypatch):
    args, data, log, metrics, h, pred = finished_run(tmp_path)
    real = runs.append_row

    def append(path, row):
        if when == "after":
            real(path, row)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "append_row", append)
    with pytest.raises(KeyboardInterrupt):
        runs.save_run(args, data, log, "ok", dict(metrics), h, pred)
    assert whole_or_nothing(args.out) == (when == "after")


def test_a_real_signal_while_the_run_lands_waits_until_it_has(tmp_path, monkeypatch):
    """SIGINT or SIGTERM between the folder's rename and the row: the run lands whole, then stops."""
    args, data, log, metrics, h, pred = finished_run(tmp_path)
    real_rename = os.rename
    before = signal.getsignal(signal.SIGTERM)  # an earlier test in the process may have set its own
    for k, sig in enumerate((signal.SIGINT, signal.SIGTERM)):
        args.out = str(tmp_path / f"sig{k}" / "r.csv")

        def rename(a, b):
            real_rename(a, b)
            os.kill(os.getpid(), sig)  # delivered now: save_run holds it until the row is written
            time.sleep(0.1)

        monkeypatch.setattr(runs.os, "rename", rename)
        with cli.user_errors(script=False), pytest.raises(KeyboardInterrupt):  # user_errors turns SIGTERM into one too
            runs.save_run(args, data, log, "ok", dict(metrics), h, pred)
        monkeypatch.setattr(runs.os, "rename", real_rename)
        assert whole_or_nothing(args.out)
    assert signal.getsignal(signal.SIGTERM) == before  # save_run puts the handler back


def test_ctrl_c_ends_with_one_line_and_exit_130(tmp_path, capsys):
    runs.saved = None
    with pytest.raises(SystemExit) as e, cli.user_errors(script=False):
        raise KeyboardInterrupt
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted: nothing saved\n"
    runs.saved = str(tmp_path / "runs" / "x")
    with pytest.raises(SystemExit) as e, cli.user_errors(script=False):
        raise KeyboardInterrupt
    assert e.value.code == 130 and capsys.readouterr().err == f"interrupted: the run was saved whole in {runs.saved}\n"
    runs.saved = None


def test_a_script_stopped_mid_training_says_so_and_saves_nothing(tmp_path):
    X, y = D.synthetic_counts(n_cells=200, n_genes=60, seed=1)
    path = formats.write_h5(str(tmp_path / "s.h5"), X, Y=y)
    out = tmp_path / "r.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for sig in (signal.SIGINT, signal.SIGTERM):
        p = subprocess.Popen([sys.executable, "fedsimclr.py", "--data", path, "--rounds", "100000", "--out", str(out),
                              "--threads", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not p.stdout.readline().startswith("round 1/"):
            assert p.poll() is None, p.stderr.read()
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130 and err == "interrupted: nothing saved\n", err
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_two_runs_appending_to_one_out_both_land(tmp_path):
    args, data, log, metrics, h, pred = finished_run(tmp_path)
    for _ in range(2):
        runs.save_run(args, data, log, "ok", dict(metrics), h, pred)
    folders, hidden, rows = saved(args.out)
    assert len(rows) == 2 and sorted(rows) == folders and hidden == []


# A child that sends itself a signal the moment a script first imports `module`: a Ctrl-C that lands
# while numpy or torch load, every time, without guessing how long loading takes.
CTRL_C_AT_IMPORT = """
import builtins, os, runpy, signal, sys
module, sig, real = sys.argv.pop(1), int(sys.argv.pop(1)), builtins.__import__
def hook(name, *a, **k):
    if name == module and name not in sys.modules:
        os.kill(os.getpid(), sig)
    return real(name, *a, **k)
builtins.__import__ = hook
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script,module,sig", [("fedsc.py", "torch", signal.SIGINT), ("fedpca.py", "numpy", signal.SIGINT),
                                               ("centralized.py", "torch", signal.SIGTERM), ("split.py", "numpy", signal.SIGTERM)])
def test_a_signal_while_the_libraries_load_ends_with_one_line(script, module, sig):
    p = subprocess.run([sys.executable, "-c", CTRL_C_AT_IMPORT, module, str(int(sig)), script, "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stderr, p.stdout) == (130, "interrupted: nothing saved\n", "")


# A child that sends itself a signal as the interpreter exits, after the script's last line: where
# torch's own exit callbacks run (a KeyboardInterrupt there prints "Exception ignored ..." and a traceback).
CTRL_C_AT_EXIT = """
import atexit, os, runpy, signal, sys, time
atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(1)))
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_signal_as_the_script_exits_after_saving_ends_with_one_line(tmp_path):
    X, y = D.synthetic_counts(n_cells=60, n_genes=30, n_types=2, seed=0)
    h5, out = formats.write_h5(str(tmp_path / "s.h5"), X, Y=y), tmp_path / "o" / "r.csv"
    p = subprocess.run([sys.executable, "-c", CTRL_C_AT_EXIT, "fedsimclr.py", "--data", h5, "--rounds", "1",
                        "--local-epochs", "1", "--n-genes", "20", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    folders, hidden, rows = saved(str(out))
    assert len(rows) == 1 and folders == rows and hidden == []
    assert (p.returncode, p.stderr) == (130, f"interrupted: the run was saved whole in {tmp_path / 'o' / 'runs' / rows[0]}\n")
