"""GLUE data loading from local TSV files, and the task metrics (written here, no `evaluate`)."""
import math
import os
import random

import pytest
import torch

from peftkern.app import glue

BOM = "\ufeff"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_mrpc_with_bom_and_unbalanced_quotes(tmp_path):
    header = f"{BOM}Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    rows = ['1\t1\t2\tHe said "hello there.\tShe said "bye" twice.\n',
            "0\t3\t4\tplain one\t\"quoted start\n",
            "1\t5\t6\tNA\tnull\n"]
    for name in ("train.tsv", "dev.tsv"):
        write(tmp_path / "MRPC" / name, header + "".join(rows))
    splits = glue.load_splits(glue.get_task("mrpc"), str(tmp_path))
    assert sorted(splits.train.column_names) == ["label", "text_a", "text_b"]
    assert splits.train["label"] == [1, 0, 1]
    assert splits.train["text_a"][0] == 'He said "hello there.'  # quotes kept verbatim, nothing merged
    assert splits.train["text_b"][1] == '"quoted start'
    assert splits.train["text_a"][2] == "NA" and splits.train["text_b"][2] == "null"  # not read as missing


def test_real_mrpc_files_parse_completely():
    data = os.environ.get("PEFTKERN_GLUE_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                            "glue"))
    if not os.path.isdir(os.path.join(data, "MRPC")):
        pytest.skip("GLUE fixtures not present")
    splits = glue.load_splits(glue.get_task("mrpc"), data)
    assert splits.sizes == {"train": 3668, "eval": 408}  # PROVENANCE.md's row counts
    assert set(splits.eval["label"]) == {0, 1}


def test_cola_without_header_and_nli_text_labels(tmp_path):
    write(tmp_path / "CoLA" / "train.tsv", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\t\tA dog ran.\n")
    cola = glue.load_splits(glue.get_task("cola"), str(tmp_path))
    assert cola.train["label"] == [1, 0] and cola.train["text_a"] == ["The cat sat.", "Cat the sat."]

    head = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label\n"
    body = "".join(f"{i}\t0\t0\tg\t-\t-\t-\t-\tpremise {i}\thyp {i}\tx\t{lab}\n"
                   for i, lab in enumerate(["neutral", "entailment", "contradiction"]))
    write(tmp_path / "MNLI" / "train.tsv", head + body)
    write(tmp_path / "MNLI" / "dev_matched.tsv", head + body)
    mnli = glue.load_splits(glue.get_task("mnli"), str(tmp_path))
    assert mnli.train["label"] == [1, 0, 2]  # the hub's ids: entailment 0, neutral 1, contradiction 2
    assert mnli.eval["text_b"] == ["hyp 0", "hyp 1", "hyp 2"]

    write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        glue.load_splits(glue.get_task("rte"), str(tmp_path))


def test_stsb_is_regression(tmp_path):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    body = "0\tg\tf\t2012\t0\ts\ts\tA man.\tA person.\t4.25\n1\tg\tf\t2012\t1\ts\ts\tA.\tB.\t0.5\n"
    for name in ("train.tsv", "dev.tsv"):
        write(tmp_path / "STS-B" / name, head + body)
    task = glue.get_task("stsb")
    splits = glue.load_splits(task, str(tmp_path))
    assert task.is_regression and splits.train["label"] == pytest.approx([4.25, 0.5])


def test_split_dev_and_sample_limits(tmp_path):
    rows = "".join(f"sentence {i}\t{i % 2}\n" for i in range(100))
    for name in ("train.tsv", "dev.tsv"):
        write(tmp_path / "SST-2" / name, "sentence\tlabel\n" + rows)
    task = glue.get_task("sst2")
    s = glue.load_splits(task, str(tmp_path), split_dev=True)
    assert s.sizes == {"train": 90, "dev": 10, "eval": 100}
    assert not set(s.train["text_a"]) & set(s.dev["text_a"])  # disjoint 9:1 split
    again = glue.load_splits(task, str(tmp_path), split_dev=True)
    assert again.dev["text_a"] == s.dev["text_a"]  # the same split every time (every seed)
    small = glue.load_splits(task, str(tmp_path), max_train_samples=7, max_eval_samples=5)
    assert small.sizes == {"train": 7, "eval": 5}


def test_missing_files_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"SST-2/train.tsv"):
        glue.load_splits(glue.get_task("sst2"), str(tmp_path))
    with pytest.raises(ValueError, match="valid tasks: cola, sst2, mrpc"):
        glue.get_task("glue")


# --- metrics -----------------------------------------------------------------------------------


def test_accuracy():
    assert glue.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def _binary_mcc(preds, labels):
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if den == 0 else (tp * tn - fp * fn) / den


def test_matthews_matches_the_binary_formula():
    rng = random.Random(0)
    for _ in range(20):
        labels = [rng.randint(0, 1) for _ in range(30)]
        preds = [rng.randint(0, 1) for _ in range(30)]
        assert glue.matthews(preds, labels) == pytest.approx(_binary_mcc(preds, labels), abs=1e-12)
    assert glue.matthews([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert glue.matthews([0, 1, 0], [1, 0, 1]) == pytest.approx(-1.0)
    assert glue.matthews([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction


def test_matthews_multiclass_is_pearson_of_one_hot():
    """Gorodkin's R_K: cov(X, Y) / sqrt(cov(X, X)·cov(Y, Y)) over the one-hot matrices of predictions
    and labels, with cov summed over the classes' columns (each centred by its own mean)."""
    rng = random.Random(1)
    labels = [rng.randint(0, 2) for _ in range(40)]
    preds = [y if rng.random() < 0.6 else rng.randint(0, 2) for y in labels]
    x = torch.nn.functional.one_hot(torch.tensor(preds), 3).double()
    y = torch.nn.functional.one_hot(torch.tensor(labels), 3).double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    want = float((xc * yc).sum() / torch.sqrt((xc ** 2).sum() * (yc ** 2).sum()))
    assert glue.matthews(preds, labels) == pytest.approx(want, abs=1e-12)


def test_pearson():
    rng = random.Random(2)
    a = [rng.gauss(0, 1) for _ in range(50)]
    b = [x * 0.5 + rng.gauss(0, 1) for x in a]
    want = float(torch.corrcoef(torch.tensor([a, b], dtype=torch.float64))[0, 1])
    assert glue.pearson(a, b) == pytest.approx(want, abs=1e-12)
    assert glue.pearson([1.0, 1.0], [0.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match="as many predictions as labels"):
        glue.pearson([1.0], [1.0, 2.0])
