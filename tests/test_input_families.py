"""Bad input, family by family: each is refused before any training with one DataError (one
`error:` line and exit 2 in a script), and what is valid keeps reading as before."""
import argparse
import importlib
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import common  # noqa: E402
import data as D  # noqa: E402
import federated  # noqa: E402
import formats  # noqa: E402
import runs  # noqa: E402
import split  # noqa: E402

TINY = ["--rounds", "1", "--local-epochs", "1", "--n-genes", "50"]


def parse(name, argv, tmp):
    return common.parse_args(importlib.import_module(name).Args, list(argv) + ["--out", str(tmp / "out" / "r.csv")])


def refused(expect, name, argv, tmp):
    """The script's setup (parse, check, read, partition) raises one DataError matching expect."""
    with pytest.raises(D.DataError, match=expect):
        common.setup(parse(name, argv, tmp))


def synth(tmp, name="s.h5", n=60, genes=40, types=3, **extra):
    X, y = D.synthetic_counts(n_cells=n, n_genes=genes, n_types=types, seed=1)
    return formats.write_h5(str(tmp / name), X, Y=y, **extra), X, y


# --------------------------------------------------------------------------------------------- --out
def test_out_is_checked_whole_before_training(tmp_path):
    out = tmp_path / "r.csv"
    out.write_text("")  # an empty (touched) file is a new results CSV
    cli.check_out(str(out))
    runs.append_row(str(out), {"config_id": "a", "run": "x"})
    assert list(pd.read_csv(out)["config_id"]) == ["a"]
    broken = tmp_path / "broken.csv"
    broken.write_text("config_id,run\na,x\nb,y,z,w\n")
    with pytest.raises(D.DataError, match="cannot be read as a results CSV .*Expected 2 fields"):
        cli.check_out(str(broken))
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00config_id\n\x81")
    with pytest.raises(D.DataError, match="cannot be read as a results CSV"):
        cli.check_out(str(tmp_path / "binary.csv"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "runs").write_text("a file where the run folders go")
    with pytest.raises(D.DataError, match="its run folder .* is not a folder"):
        cli.check_out(str(tmp_path / "d" / "r.csv"))
    os.mkfifo(tmp_path / "fifo.csv")
    with pytest.raises(D.DataError, match="not a regular file"):
        cli.check_out(str(tmp_path / "fifo.csv"))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "r.csv.lock").mkdir()
    with pytest.raises(D.DataError, match="its lock file .* is not a file"):
        cli.check_out(str(tmp_path / "e" / "r.csv"))
    with pytest.raises(D.DataError, match="is 244 bytes; a file name can have at most 243 here"):  # with '.<pid>.tmp'
        cli.check_out(str(tmp_path / ("r" * 240 + ".csv")))
    cli.check_out(str(tmp_path / ("r" * 239 + ".csv")))
    runs.append_row(str(tmp_path / ("r" * 239 + ".csv")), {"config_id": "a", "run": "x"})  # and saving works
    with pytest.raises(D.DataError, match="is 300 bytes; a folder name can have at most 255"):  # found before training
        cli.check_out(str(tmp_path / ("e" * 300) / "r.csv"))
    with pytest.raises(D.DataError, match="bytes long; paths can have at most"):  # the whole path (22 folders of 200)
        cli.check_out(os.path.join(str(tmp_path), *["f" * 200] * 22, "r.csv"))
    assert not os.path.exists(tmp_path / ("f" * 200))  # nothing made while checking
    assert not os.path.exists(tmp_path / "runs")  # checking creates no run folder
    long_data = argparse.Namespace(data="x" * 240 + ".h5", sites=None, method="FedSC", seed=0, out=str(out))
    assert len(os.path.basename(runs.run_folder(long_data, staged=True))) < 150  # a long data name: a short folder name


# --------------------------------------------------------------------------------------------- labels files
def test_labels_header_only_when_declared_or_obvious(tmp_path):
    path, X, y = synth(tmp_path)
    pd.DataFrame(X, index=[f"c{i}" for i in range(60)], columns=[f"g{j}" for j in range(40)]).to_csv(tmp_path / "t.csv")
    table, names = str(tmp_path / "t.csv"), np.array(["B", "NK", "T"])
    lines = list(names[y])
    (tmp_path / "plus1.txt").write_text("\n".join(["Mono"] + lines) + "\n")  # one line too many: not a header
    with pytest.raises(D.DataError, match=r"61 labels for 60 cells; if its first line \('Mono'\) is a header, pass --labels-header"):
        D.read_counts(table, labels=str(tmp_path / "plus1.txt"))
    yh = D.read_counts(table, labels=formats.Labels(str(tmp_path / "plus1.txt"), header=True))[1]
    assert np.array_equal(yh, y)  # declared: the first line is dropped, every label on its own cell
    gap = ["cell_type"] + lines[:30] + [""] + lines[31:]  # a header plus a blank line: not a silent shift
    (tmp_path / "gap.txt").write_text("\n".join(gap) + "\n\n")
    with pytest.raises(D.DataError, match="line 32 has no label"):
        D.read_counts(table, labels=str(tmp_path / "gap.txt"))
    for first, body in (("cell_type", lines), ("label", [str(v) for v in y]), ('"","x"', lines)):
        (tmp_path / "h.txt").write_text("\n".join([first] + body))  # obviously a header: dropped
        assert np.array_equal(D.read_counts(table, labels=str(tmp_path / "h.txt"))[1], y)
    (tmp_path / "na.txt").write_text("\n".join(lines[:5] + ["NA"] + lines[6:]))
    with pytest.raises(D.DataError, match="line 6 has no label"):
        D.read_counts(table, labels=str(tmp_path / "na.txt"))
    refused("--labels and --label-key both", "fedsc", ["--data", path, "--labels", str(tmp_path / "h.txt"), "--label-key", "Y"], tmp_path)
    refused("--labels-header is about a --labels file", "fedsc", ["--data", path, "--labels-header"], tmp_path)
    assert "labels_header" not in vars(parse("fedsc", [], tmp_path))  # recorded only when given
    assert parse("fedsc", ["--labels", "l.txt", "--labels-header"], tmp_path).labels_header


def test_labels_files_with_cell_names_quotes_or_many_columns(tmp_path):
    """Two columns are cell name, label: matched by name, in any order; quotes keep a comma in a
    label; a third column is refused (never the last one taken as the label)."""
    path, X, y = synth(tmp_path)
    cells = [f"c{i}" for i in range(60)]
    pd.DataFrame(X, index=cells, columns=[f"g{j}" for j in range(40)]).to_csv(tmp_path / "t.csv")
    table, names = str(tmp_path / "t.csv"), np.array(["CD4 T, naive", "CD8 T, naive", "NK"])
    rev = pd.DataFrame({"barcode": cells, "cell_type": names[y]}).iloc[::-1]
    rev.to_csv(tmp_path / "rev.csv", index=False)  # reversed order, quoted commas
    codes, found = D.read_counts(table, labels=str(tmp_path / "rev.csv"))[1:3]
    assert list(found) == list(names) and np.array_equal(found[codes], names[y])
    rev.iloc[1:].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(D.DataError, match="1 of the 60 cells have no line"):
        D.read_counts(table, labels=str(tmp_path / "short.csv"))
    rev.assign(n_genes=7).to_csv(tmp_path / "meta.csv", index=False)
    with pytest.raises(D.DataError, match="lines of 3 columns"):
        D.read_counts(table, labels=str(tmp_path / "meta.csv"))


def test_labels_that_are_a_per_cell_value_or_too_many_clusters(tmp_path):
    path, X, y = synth(tmp_path)
    per_cell = formats.write_h5(str(tmp_path / "pc.h5"), X, Y=np.arange(60) % 50)  # like a count column
    refused("40 of the 60 cells have a label that no other cell has", "fedsc", ["--data", per_cell], tmp_path)
    refused("--n-clusters 60: clustering needs fewer clusters than the 60 cells", "fedsc",
            ["--data", path, "--n-clusters", "60"], tmp_path)
    refused("federated evaluation clusters only them", "fedsc", ["--data", path, "--clients", "2", "--types-per-client", "1",
            "--evaluate", "federated", "--n-clusters", "50"], tmp_path)


def test_names_and_labels_must_fit_the_matrix(tmp_path):
    path, X, y = synth(tmp_path, gene_names=[f"g{j}" for j in range(39)])
    with pytest.raises(D.DataError, match="39 gene names for 40 genes; they must match"):
        D.read_counts(path)
    path = formats.write_h5(str(tmp_path / "y2.h5"), X, Y=np.stack([y, y], 1))
    with pytest.raises(D.DataError, match=r"labels of shape \(60, 2\)"):
        D.read_counts(path)
    path = formats.write_h5(str(tmp_path / "codes.h5"), X, Y=y + 5, label_names=["a", "b", "c"])
    with pytest.raises(D.DataError, match="integer code 0..2 of label_names"):
        D.read_counts(path)


# --------------------------------------------------------------------------------------------- orientation
def test_h5ad_transpose_swaps_the_names_and_symbol_tables_are_oriented(tmp_path):
    X, y = D.synthetic_counts(n_cells=50, n_genes=30, seed=2)
    cells, genes = [f"cell{i}" for i in range(50)], [f"g{j}" for j in range(30)]
    path = formats.write_h5ad(str(tmp_path / "gxc.h5ad"), X.T, genes, cells)
    found = {}
    Xr = D.read_counts(path, transpose=True, names=found)[0]
    assert np.array_equal(Xr, X) and list(found["barcodes"]) == cells and list(found["genes"]) == genes
    symbols = ["ACTB", "GAPDH", "MT-CO1", "RPL13", "RPS4X", "B2M"] + [f"GENE{j}" for j in range(24)]
    pd.DataFrame(X.T, index=symbols, columns=cells).to_csv(tmp_path / "gxc.csv")
    with pytest.raises(D.DataError, match="pass --transpose"):
        D.read_counts(str(tmp_path / "gxc.csv"))
    assert D.read_counts(str(tmp_path / "gxc.csv"), transpose=True)[0].shape == (50, 30)
    pd.DataFrame(X, index=cells, columns=symbols).to_csv(tmp_path / "cxg.csv")
    assert D.read_counts(str(tmp_path / "cxg.csv"))[0].shape == (50, 30)
    with pytest.raises(D.DataError, match="drop --transpose"):
        D.read_counts(str(tmp_path / "cxg.csv"), transpose=True)
    h5, _ = _tenx(tmp_path, X)
    with pytest.raises(D.DataError, match="10x HDF5 .* drop --transpose"):
        D.read_counts(h5, transpose=True)


# --------------------------------------------------------------------------------------------- file layouts
def test_h5ad_nullable_and_categorical_obs_columns(tmp_path):
    import anndata
    X, y = D.synthetic_counts(n_cells=40, n_genes=20, seed=3)
    obs = pd.DataFrame({"i": pd.array(y, dtype="Int64"), "b": pd.array(y > 1, dtype="boolean"),
                        "s": pd.Categorical(pd.array(np.array(list("abcd"))[y], dtype="string")),
                        "gap": pd.array(np.where(np.arange(40) == 7, None, y), dtype="Int64"),
                        "nancat": pd.Categorical(np.where(np.arange(40) == 3, None, np.array(list("abcd"))[y])),
                        "empty": np.where(np.arange(40) == 5, "", np.array(list("abcd"))[y]),
                        "nanstr": np.where(np.arange(40) == 6, "NaN", np.array(list("abcd"))[y]),
                        "utf8": np.array(["T γδ", "Zelle ä", "b", "c"])[y]},
                       index=[f"c{i}" for i in range(40)])
    with anndata.settings.override(allow_write_nullable_strings=True):
        anndata.AnnData(sp.csr_matrix(X), obs=obs).write_h5ad(tmp_path / "n.h5ad")
    path = str(tmp_path / "n.h5ad")
    for key in ("i", "s"):
        assert np.array_equal(D.read_counts(path, label_key=key)[1], np.unique(y, return_inverse=True)[1])
    assert np.array_equal(D.read_counts(path, label_key="b")[1], (y > 1).astype(int))
    for key in ("gap", "nancat", "empty", "nanstr"):  # missing however it is written, as in a labels file
        with pytest.raises(D.DataError, match="labels are missing"):
            D.read_counts(path, label_key=key)
    codes, names = D.read_counts(path, label_key="utf8")[1:3]  # text beyond ASCII is read as UTF-8
    assert np.array_equal(names[codes], np.array(["T γδ", "Zelle ä", "b", "c"])[y])
    site = formats.write_h5(str(tmp_path / "té.h5"), X, Y=np.array(["Té", "b", "c", "d"])[y],
                            gene_names=[f"Gène{j}" for j in range(20)], cell_names=[f"c{i}" for i in range(40)])
    found = {}
    codes, names = D.read_counts(site, names=found)[1:3]
    assert list(names) == ["Té", "b", "c", "d"] and found["genes"][0] == "Gène0"


def _tenx(tmp, X):
    m = sp.csc_matrix(X.T.astype(np.int32))
    path = str(tmp / "tenx.h5")
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"], g["shape"] = m.data, m.indices, m.indptr, np.array(m.shape)
        g["barcodes"] = np.array([f"AAACCTGAGAAACCTG-{i}" for i in range(X.shape[0])]).astype("S")
        g.create_group("features")["name"] = np.array([f"G{j}" for j in range(X.shape[1])]).astype("S")
    return path, m


def test_damaged_hdf5_files(tmp_path):
    X, y = D.synthetic_counts(n_cells=30, n_genes=20, seed=4)
    m = sp.csc_matrix(X.T.astype(np.int32))
    with h5py.File(tmp_path / "barnyard.h5", "w") as f:  # Cell Ranger v2, human + mouse: a group per genome
        for genome in ("hg19", "mm10"):
            g = f.create_group(genome)
            g["data"], g["indices"], g["indptr"], g["shape"] = m.data, m.indices, m.indptr, np.array(m.shape)
            g["barcodes"] = np.array([f"B{i}" for i in range(30)]).astype("S")
            g["gene_names"] = np.array([f"{genome}_G{j}" for j in range(20)]).astype("S")
    with pytest.raises(D.DataError, match=r"holds 2 genomes \(hg19, mm10\)"):
        D.read_counts(str(tmp_path / "barnyard.h5"))
    path, m = _tenx(tmp_path, X)
    with h5py.File(path, "a") as f:
        del f["matrix/indptr"]
    with pytest.raises(D.DataError, match="10x HDF5 file but its group '/matrix' lacks indptr"):
        D.read_counts(path)
    with h5py.File(tmp_path / "noshape.h5ad", "w") as f:
        f.create_group("obs")
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
    with pytest.raises(D.DataError, match="not a sparse matrix.*missing: shape"):
        D.read_counts(str(tmp_path / "noshape.h5ad"))
    good = formats.write_h5(str(tmp_path / "g.h5"), X, Y=y)
    (tmp_path / "cut.h5").write_bytes(open(good, "rb").read()[:3000])  # a truncated download
    with pytest.raises(D.DataError, match="cannot read"):
        D.read_counts(str(tmp_path / "cut.h5"))


def test_sparse_matrices_are_checked_whole(tmp_path):
    """An index beyond the shape, an indptr that goes down or parts that are not lists are refused:
    read as stored they crash the process (out-of-bounds reads) or drop entries silently."""
    X, y = D.synthetic_counts(n_cells=30, n_genes=20, seed=4)
    m = sp.csr_matrix(X)

    def h5ad(name, data, indices, indptr, shape):
        with h5py.File(tmp_path / name, "w") as f:
            g = f.create_group("X")
            g.attrs["encoding-type"], g.attrs["shape"] = "csr_matrix", shape
            g["data"], g["indices"], g["indptr"] = data, indices, indptr
            f.create_group("obs")
        return str(tmp_path / name)
    D.read_counts(h5ad("ok.h5ad", m.data, m.indices, m.indptr, m.shape))
    far, down = m.indices.copy(), m.indptr.copy()
    far[5], down[10] = 500, down[12]
    for bad in (h5ad("narrow.h5ad", m.data, m.indices, m.indptr, (30, 15)), h5ad("far.h5ad", m.data, far, m.indptr, m.shape),
                h5ad("down.h5ad", m.data, m.indices, down, m.shape), h5ad("2d.h5ad", m.data[None], m.indices, m.indptr, m.shape)):
        with pytest.raises(D.DataError, match="the sparse matrix is inconsistent"):
            D.read_counts(bad)
    path, t = _tenx(tmp_path, X)
    with h5py.File(path, "a") as f:
        f["matrix/indices"][3] = 900
    with pytest.raises(D.DataError, match="the sparse matrix is inconsistent"):
        D.read_counts(path)
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["X"], f["Y"] = X[0], y[:1]
    with pytest.raises(D.DataError, match=r"counts of shape \(20,\); they must be a cells x genes matrix"):
        D.read_counts(str(tmp_path / "flat.h5"))
    path, t = _tenx(tmp_path, X)
    with h5py.File(path, "a") as f:
        f["matrix/features/feature_type"] = np.array(["Antibody Capture"] * 20).astype("S")
    with pytest.raises(D.DataError, match="none of its 20 features is 'Gene Expression' .they are Antibody Capture"):
        D.read_counts(path)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float16 counts: no overflow warning from the 2^53 check
        assert D.read_counts(formats.write_h5(str(tmp_path / "f16.h5"), X.astype(np.float16), Y=y))[0].dtype == np.float16


def test_tables_by_their_content(tmp_path):
    """The separator is the header line's (';', a tab in a .csv); a separator ending every line, an
    upper-case or gzip extension read as expected; a repeated gene name stays repeated (pandas would
    rename it); a header without rows is refused by name."""
    X, y = D.synthetic_counts(n_cells=30, n_genes=20, seed=4)
    df = pd.DataFrame(X, index=[f"c{i}" for i in range(30)], columns=[f"g{j}" for j in range(20)])
    df.to_csv(tmp_path / "ok.csv")
    (tmp_path / "trail.csv").write_text("".join(line.rstrip("\n") + ",\n" for line in open(tmp_path / "ok.csv")))
    for name, kw in (("semi.csv", dict(sep=";")), ("tab.csv", dict(sep="\t")), ("comma.tsv", {}), ("UP.CSV", {}), ("z.csv.gz", {})):
        df.to_csv(tmp_path / name, **kw)
    for name in ("ok.csv", "trail.csv", "semi.csv", "tab.csv", "comma.tsv", "UP.CSV", "z.csv.gz"):
        got, rows, cols = D.read_counts(str(tmp_path / name))[0], *formats.read_table(str(tmp_path / name))[1:]
        assert np.array_equal(got, X) and list(cols) == list(df.columns) and rows[0] == "c0", name
    (tmp_path / "semi_names.tsv").write_text("a;1\tb;2\tc;3\nc0\t1\t2\t3\nc1\t4\t5\t6\n")  # R style, ';' in names
    got = formats.read_table(str(tmp_path / "semi_names.tsv"))
    assert got[0].tolist() == [[1, 2, 3], [4, 5, 6]] and list(got[2]) == ["a;1", "b;2", "c;3"]
    (tmp_path / "na.csv").write_text("cell,NA,g1,None\nc0,1,2,3\nc1,4,5,6\n")  # names that pandas reads as NaN
    assert list(formats.read_table(str(tmp_path / "na.csv"))[2]) == ["NA", "g1", "None"]
    df.set_axis(["g0"] + list(df.columns[1:-1]) + ["g0"], axis=1).to_csv(tmp_path / "dup.csv")
    assert list(formats.read_table(str(tmp_path / "dup.csv"))[2][[0, -1]]) == ["g0", "g0"]
    df.iloc[:0].to_csv(tmp_path / "head.csv")
    with pytest.raises(D.DataError, match="has a header line but no rows of counts"):
        D.read_counts(str(tmp_path / "head.csv"))


def test_names_labels_and_benchmarks_that_do_not_fit(tmp_path, monkeypatch):
    """Integer gene names at one site and text at another are one naming; one label spelled two ways in
    one file is refused; a two-column labels file naming no cell of the data is refused (row numbers
    are an index); a file in $FEDSC_DATA_DIR under a benchmark's name must be that benchmark."""
    X, y = D.synthetic_counts(n_cells=60, n_genes=40, n_types=3, seed=1)
    a = formats.write_h5(str(tmp_path / "a.h5"), X[:30], Y=y[:30], gene_names=np.arange(40))
    b = formats.write_h5(str(tmp_path / "b.h5"), X[30:], Y=y[30:], gene_names=[str(j) for j in range(40)])
    assert common.setup(parse("fedsc", ["--sites", a, b, "--n-genes", "30"], tmp_path)).X.shape[0] == 60
    spelt = np.array(["B", "NK", "T"])[y].astype(object)
    spelt[::4] = np.where(spelt[::4] == "B", "B ", spelt[::4])
    refused("the labels spell one type 'B' and 'B '", "fedsc",
            ["--data", formats.write_h5(str(tmp_path / "sp.h5"), X, Y=spelt.astype("S"))], tmp_path)
    pd.DataFrame(X, index=[f"c{i}" for i in range(60)], columns=[f"g{j}" for j in range(40)]).to_csv(tmp_path / "t.csv")
    pd.DataFrame({"barcode": [f"c{i}-1" for i in range(60)], "t": y}).to_csv(tmp_path / "l.csv", index=False)
    refused(r"its first column names cells \('c0-1', ...\) but none is a cell of the data \('c0'", "fedsc",
            ["--data", str(tmp_path / "t.csv"), "--labels", str(tmp_path / "l.csv")], tmp_path)
    pd.DataFrame({"t": y}).to_csv(tmp_path / "r.csv")  # pandas' row numbers, then the label
    assert np.array_equal(D.read_counts(str(tmp_path / "t.csv"), labels=str(tmp_path / "r.csv"))[1], y)
    pd.DataFrame({"donor": np.repeat(["d1", "d2"], 30), "t": y}).to_csv(tmp_path / "d.csv", index=False)
    assert np.array_equal(D.read_counts(str(tmp_path / "t.csv"), labels=str(tmp_path / "d.csv"))[1], y)  # not names
    (tmp_path / "rh.csv").write_text('"","cell.type.l2"\n' + "".join(f"{i + 1},{'BTN'[v]}\n" for i, v in enumerate(y)))
    refused("if its first line .* is a header, pass --labels-header", "fedsc",  # R's write.csv: the hint, not names
            ["--data", str(tmp_path / "t.csv"), "--labels", str(tmp_path / "rh.csv")], tmp_path)
    monkeypatch.setenv("FEDSC_DATA_DIR", str(tmp_path))
    formats.write_h5(str(tmp_path / D.BENCHMARKS["mouse_bladder"]["file"]), X, Y=y)
    with pytest.raises(D.DataError, match="is not the benchmark's file"):
        cli.resolve(parse("fedsc", ["--data", "mouse_bladder"], tmp_path))


def test_special_files_and_folders_as_data(tmp_path):
    (tmp_path / "empty.h5").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo.h5")
    (tmp_path / "folder").mkdir()
    for data, expect in ((str(tmp_path / "empty.h5"), "is empty"), (str(tmp_path / "fifo.h5"), "is a FIFO"),
                         ("/dev/zero", "is a device"), (str(tmp_path / "folder"), "not a 10x matrix folder")):
        with pytest.raises(D.DataError, match=expect):
            cli.resolve(parse("fedsc", ["--data", data], tmp_path))
    with pytest.raises(D.DataError, match="--labels .* is a FIFO"):
        cli.check_args(parse("fedsc", ["--labels", str(tmp_path / "fifo.h5")], tmp_path))


# --------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("name,flag,value,expect", [
    ("fedsc", "--lr", "inf", "--lr must be a finite number"), ("fedsc", "--momentum", "inf", "--momentum must be a finite"),
    ("fedsc", "--momentum", "1.5", r"--momentum must be in \[0, 1\)"), ("fedsc", "--alpha", "inf", "--alpha must be a finite"),
    ("fedsimclr", "--temperature", "inf", "--temperature must be a finite"), ("fedmoco", "--temperature", "nan", "--temperature must be"),
    ("fedbyol", "--weight-decay", "-inf", "--weight-decay must be a finite"), ("centralized", "--csc-lr", "inf", "--csc-lr must be a finite"),
    ("fedsc", "--dirichlet-alpha", "1e-10", "--dirichlet-alpha must be positive and at least 0.01")])
def test_every_float_option_is_finite_and_in_range(name, flag, value, expect, tmp_path):
    with pytest.raises(D.DataError, match=expect):
        cli.check_args(parse(name, [f"{flag}={value}"] + (["--partition", "dirichlet"] if "dirichlet" in flag else [])
                             + (["--baseline", "csc"] if "csc" in flag else []), tmp_path))


@pytest.mark.parametrize("flags,partition", [(["--types-per-client", "2"], "iid"), (["--shuffle-classes"], "dirichlet"),
                                             (["--dirichlet-alpha", "0.5"], "class"), (["--dirichlet-alpha", "0.5"], "iid")])
def test_partition_options_of_another_partition_are_refused(flags, partition, tmp_path):
    with pytest.raises(D.DataError, match="would be ignored .and recorded as if used"):
        parse("fedsc", flags + ["--partition", partition], tmp_path)
    parse("fedsc", flags + ["--partition", "dirichlet" if "--dirichlet-alpha" in flags else "class"], tmp_path)


@pytest.mark.parametrize("name,flags,fine", [
    ("fedpca", ["--lr", "0.1"], []), ("fedpca", ["--rounds", "5", "--no-l2norm"], []),
    ("centralized", ["--epochs", "5"], ["--epochs", "5", "--baseline", "csc"]),
    ("centralized", ["--csc-batch", "64"], ["--csc-batch", "64", "--baseline", "csc"]),
    ("centralized", ["--n-components", "20"], ["--n-components", "20", "--baseline", "pca"]),
    ("fedbyol", ["--tau", "0.9", "--no-ema"], ["--tau", "0.9"]), ("fedbyol", ["--tau-schedule", "cosine", "--no-ema"], ["--no-ema"]),
    ("fedbyol", ["--predictor", "mlp", "--no-predictor"], ["--predictor", "mlp"])])
def test_options_a_script_or_baseline_does_not_use_are_refused(name, flags, fine, tmp_path):
    """FedPCA trains nothing; --epochs and --csc-* are contrastive-sc's, --n-components PCA-50's; --no-ema has
    no tau, --no-predictor no predictor: given where unused they would be recorded in the row as if used."""
    other = ["--baseline", "pca_raw"] if name == "centralized" else []
    with pytest.raises(D.DataError, match=f"so {flags[0]}.* would be ignored .and recorded as if used"):
        parse(name, flags + other, tmp_path)
    parse(name, fine, tmp_path)  # where they are used (or without them) they are taken


def test_data_that_cannot_be_clustered_or_queued(tmp_path):
    path, X, y = synth(tmp_path, types=1)
    refused(r"single cell type \('0'\): one cluster says nothing", "fedsc", ["--data", path, "--partition", "iid"], tmp_path)
    path, X, y = synth(tmp_path, name="q.h5")
    refused("--queue-size 100000 is far above the 60 cells.*at most 256", "fedmoco", ["--data", path, "--queue-size", "100000"], tmp_path)


def test_sites_refuse_what_they_would_ignore_twice_given_files_and_duplicate_genes(tmp_path):
    a, X, y = synth(tmp_path, "a.h5", gene_names=[f"g{j}" for j in range(40)])
    b = formats.write_h5(str(tmp_path / "b.h5"), X[:30], Y=y[:30], gene_names=[f"g{j % 39}" for j in range(40)])
    for flags in (["--clients", "3"], ["--partition", "iid"], ["--types-per-client", "1"], ["--data", a], ["--labels", "l.txt"]):
        with pytest.raises(D.DataError, match=f"--sites makes one client of each file, so {flags[0]} would be ignored"):
            parse("fedsc", ["--sites", a, b] + flags, tmp_path)
    os.symlink(a, tmp_path / "link.h5")
    refused(r"site 1 \('.*link.h5'\) is the same file as site 0", "fedsc", ["--sites", a, str(tmp_path / "link.h5")], tmp_path)
    refused(r"site 1 \('.*b.h5'\) names 1 genes twice \(e.g. 'g0'\)", "fedsc", ["--sites", a, b], tmp_path)
    with pytest.raises(D.DataError, match="--sites is given twice"):
        parse("fedsc", ["--sites", a, "--sites", b], tmp_path)



def test_sites_must_share_one_label_vocabulary(tmp_path):
    """Codes at one site and names at another, or one name spelled two ways, would count one type twice."""
    X, y = D.synthetic_counts(n_cells=60, n_genes=40, n_types=3, seed=1)
    genes, names = [f"g{j}" for j in range(40)], np.array(["B cell", "NK", "T"])
    site = lambda name, labels: formats.write_h5(str(tmp_path / name), X[:30] if name < "b" else X[30:],
                                                 Y=labels, gene_names=genes)
    a = site("a.h5", names[y[:30]].astype("S"))
    for b, expect in ((site("b.h5", y[30:]), r"site 1's labels are numbers \(0, 1, 2\) and site 0's are names"),
                      (site("b2.h5", (y[30:] + 1).astype(str).astype("S")), r"site 1's labels are numbers \(1, 2, 3\)"),
                      (site("b3.h5", np.array(["B_Cell", "NK", "T"])[y[30:]].astype("S")),
                       r"the sites spell one label 'B cell' and 'B_Cell'")):
        refused(expect, "fedsc", ["--sites", a, b], tmp_path)
    common.setup(parse("fedsc", ["--sites", a, site("b4.h5", names[y[30:]].astype("S"))], tmp_path))  # one vocabulary
    federated.check_site_labels([np.array(["1", "2"]), np.array(["2", "3"])])  # codes at every site: the user's meaning


def test_counts_beyond_exact_integers_are_not_counts(tmp_path):
    X, y = D.synthetic_counts(n_cells=60, n_genes=40, n_types=3, seed=1)
    for value in (1e300, 2.0 ** 60):
        big = X.astype(float)
        big[0, 0] = value
        refused(r"counts up to .* are not raw counts \(integers are exact only up to 2\^53", "fedsc",
                ["--data", formats.write_h5(str(tmp_path / "big.h5"), big, Y=y)], tmp_path)
    big[0, 0] = 2.0 ** 53  # the largest exact integer is still a count
    common.setup(parse("fedsc", ["--data", formats.write_h5(str(tmp_path / "ok.h5"), big, Y=y), "--partition", "iid"], tmp_path))

# --------------------------------------------------------------------------------------------- split.py
def test_split_checks_its_input_and_says_what_partition_leaves_out(tmp_path, capsys):
    path, X, y = synth(tmp_path, types=4)
    base = dict(data=path, by="partition", out=str(tmp_path / "sites"), label_key="", clients=4, types_per_client=0, seed=0)
    args = lambda *a: argparse.Namespace(**{**base, **dict(zip(a[::2], a[1::2]))})
    pd.DataFrame(X, index=[f"c{i}" for i in range(60)], columns=[f"g{j}" for j in range(40)]).to_csv(tmp_path / "t.csv")
    (tmp_path / "file").write_text("")
    for bad, expect in ((("clients", 0), "--clients must be at least 1"), (("seed", -1), "--seed must be in"),
                        (("out", str(tmp_path / "file")), "exists and is not a folder"),
                        (("out", str(tmp_path / "file" / "sites")), "cannot create the --out folder"),
                        (("data", str(tmp_path / "t.csv"), "by", "batch"), "not an HDF5 file"),
                        (("by", "batch"), "no dataset 'batch'")):
        with pytest.raises(D.DataError, match=expect):
            split.split(args(*bad))
    split.split(args("types_per_client", 3, "clients", 2))
    assert re.search(r"\d+ of 60 cells are on no site \(3 types per site, 2 sites\)", capsys.readouterr().out)
    with pytest.raises(D.DataError, match="exists: choose another --out"):
        split.split(args("types_per_client", 3, "clients", 2))
    lone = formats.write_h5(str(tmp_path / "lone.h5"), X, Y=y, batch=np.where(np.arange(60) < 59, "a", "b"))
    with pytest.raises(D.DataError, match="site 'b' would hold 1 cell; --sites needs at least 2 cells per site"):
        split.split(args("data", lone, "by", "batch", "out", str(tmp_path / "lone")))
    assert not os.path.exists(tmp_path / "lone")  # refused before anything is written
    deep = formats.write_h5(str(tmp_path / "deep.h5"), X, Y=y, batch=np.where(np.arange(60) < 30, "x" * 300, "s"))
    with pytest.raises(D.DataError, match="is 308 bytes; a file name can have at most 243 here"):
        split.split(args("data", deep, "by", "batch", "out", str(tmp_path / "deep")))
    for blank in ("", "NaN"):  # a value that is no value (as in a labels file) is refused, never a site of its own
        odd = formats.write_h5(str(tmp_path / "odd.h5"), X, Y=y, batch=np.where(np.arange(60) < 30, blank, "s"))
        with pytest.raises(D.DataError, match=r"the column 'batch' must give every cell one value \(30 cells have none\)"):
            split.split(args("data", odd, "by", "batch", "out", str(tmp_path / "odd")))
        os.remove(odd)


def test_split_refuses_partition_options_with_a_column_and_a_file_under_a_benchmark_name(tmp_path, monkeypatch):
    path, X, y = synth(tmp_path, types=4)
    batch = formats.write_h5(str(tmp_path / "b.h5"), X, Y=y, batch=np.where(np.arange(60) < 30, "a", "b"))
    p = subprocess.run([sys.executable, "split.py", batch, "--by", "batch", "--clients", "3", "--seed", "1", "--out",
                        str(tmp_path / "s")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.splitlines() == [
        "error: --clients, --seed belong to --by partition; --by batch makes one site of each value of 'batch' (see --help)"]
    fake = tmp_path / "fake"
    fake.mkdir()
    os.link(path, fake / D.BENCHMARKS["mouse_bladder"]["file"])
    monkeypatch.setenv("FEDSC_DATA_DIR", str(fake))
    base = dict(data="mouse_bladder", by="partition", out=str(tmp_path / "sites"), label_key="", clients=4,
                types_per_client=0, seed=0)
    with pytest.raises(D.DataError, match="is not the benchmark's file"):
        split.split(argparse.Namespace(**base))
    assert not os.path.exists(tmp_path / "sites")


# --------------------------------------------------------------------------------------------- the scripts' contract
def test_scripts_end_bad_input_with_one_error_line_and_no_row(tmp_path):
    path, X, y = synth(tmp_path)
    out = tmp_path / "o" / "r.csv"
    out.parent.mkdir()
    out.write_text("config_id,run\na,x\nb,y,z\n")
    os.mkfifo(tmp_path / "fifo")
    cases = [(["fedsc.py", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
             (["fedsimclr.py", "--data", path, "--out", str(out)], "cannot be read as a results CSV"),
             (["fedsc.py", "--data", str(tmp_path / "fifo")], "is a FIFO"),
             (["split.py", path, "--by", "partition", "--clients", "0"], "--clients must be at least 1")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for argv, expect in cases:
        if "--out" not in argv and argv[0] != "split.py":
            argv = argv + ["--out", str(tmp_path / "new" / "r.csv")] + TINY
        p = subprocess.run([sys.executable] + argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.splitlines()) == 1, (argv, p.stderr)
        assert expect in p.stderr and "Traceback" not in p.stderr and "usage:" not in p.stderr
    assert out.read_text() == "config_id,run\na,x\nb,y,z\n" and not os.path.exists(tmp_path / "new")
    assert not os.path.exists(tmp_path / "o" / "runs")


def test_old_anndata_with_table_obs_and_var(tmp_path):
    """anndata < 0.7 wrote obs and var as one compound table each (a field 'index' with the names, codes
    of categoricals with their names in uns/<key>_categories): read as the newer layouts are."""
    n, g = 60, 30
    obs = np.zeros(n, dtype=[("index", "S10"), ("cell_type", "S5"), ("coded", "i1")])
    obs["index"] = [f"c{i}".encode() for i in range(n)]
    obs["cell_type"] = [b"A" if i % 2 else b"B" for i in range(n)]
    obs["coded"] = [i % 3 for i in range(n)]
    var = np.zeros(g, dtype=[("index", "S10")])
    var["index"] = [f"g{i}".encode() for i in range(g)]
    path = str(tmp_path / "old.h5ad")
    with h5py.File(path, "w") as f:
        f["X"], f["obs"], f["var"] = np.random.default_rng(0).poisson(1, (n, g)).astype(np.float32), obs, var
        f["uns/coded_categories"] = np.array([b"T", b"B", b"NK"])
    found = {}
    X, y, names, _ = D.read_counts(path, "cell_type", None, False, None, found)
    assert X.shape == (n, g) and list(names[y][:2]) == ["B", "A"]
    assert list(found["genes"][:2]) == ["g0", "g1"] and list(found["barcodes"][:2]) == ["c0", "c1"]
    _, y, names, _ = D.read_counts(path, "coded", None, False, None, {})
    assert list(names[y][:3]) == ["T", "B", "NK"]
    assert list(formats.read_column(path, "coded")[:3]) == ["T", "B", "NK"]
    with pytest.raises(D.DataError, match="obs has no column 'donor'; columns are: cell_type, coded"):
        D.read_counts(path, "donor", None, False, None, {})
