"""GLUE tasks: the task table, data loading (hub or local TSV files) and the task metrics.

Every loader returns datasets with the same columns, ``text_a``, ``text_b`` (pair tasks
only) and ``label`` (int for classification, float for STS-B), whatever the source, so
the training loop never looks at a task's own column names.

Local files follow the original GLUE layout (``<dir>/SST-2/train.tsv``, ``dev.tsv``,
``<dir>/MRPC/...``). They are read with CSV quoting off, because GLUE sentences contain
unbalanced quotes, and with ``utf-8-sig`` because MRPC's header starts with a byte-order
mark. Text labels (MNLI, QNLI, RTE) are mapped to the hub's integer ids, so a model
trained on either source means the same thing by each label.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # imported lazily at run time: `peftkern methods` should not pay for it
    import datasets

PAPER_SEEDS = (100, 482, 584, 721, 770)  # LEFT Table 6
SPLIT_SEED = 42  # --split-dev: the same 9:1 split for every training seed
SUBSAMPLE_SEED = 0  # --max-*-samples: the same subset for every training seed

_NLI3 = {"entailment": 0, "neutral": 1, "contradiction": 2}
_NLI2 = {"entailment": 0, "not_entailment": 1}


class DataUnavailable(RuntimeError):
    """The task's data cannot be had from the requested source."""


@dataclass(frozen=True)
class TsvLayout:
    """Where a task's columns are in the original GLUE TSV files."""

    folder: str
    text_a: str
    label: str
    text_b: Optional[str] = None
    dev_file: str = "dev.tsv"
    columns: Optional[Tuple[str, ...]] = None  # for header-less files (CoLA)
    label_map: Optional[Dict[str, int]] = None  # text label -> hub id


@dataclass(frozen=True)
class Task:
    name: str
    num_labels: int  # 1: regression
    metric: str  # a key of METRICS
    hub_text: Tuple[str, ...]  # the hub dataset's text columns (one or two)
    tsv: TsvLayout
    batch_size: int  # LEFT Table 6
    epochs: int  # LEFT Table 6
    hub_dev: str = "validation"

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        return len(self.hub_text) == 2


TASKS: Dict[str, Task] = {t.name: t for t in (
    Task("cola", 2, "matthews", ("sentence",),
         TsvLayout("CoLA", "sentence", "label", columns=("source", "label", "original_label", "sentence")), 8, 10),
    Task("sst2", 2, "accuracy", ("sentence",), TsvLayout("SST-2", "sentence", "label"), 8, 10),
    Task("mrpc", 2, "accuracy", ("sentence1", "sentence2"),
         TsvLayout("MRPC", "#1 String", "Quality", text_b="#2 String"), 8, 10),
    Task("qqp", 2, "accuracy", ("question1", "question2"),
         TsvLayout("QQP", "question1", "is_duplicate", text_b="question2"), 32, 5),
    Task("stsb", 1, "pearson", ("sentence1", "sentence2"),
         TsvLayout("STS-B", "sentence1", "score", text_b="sentence2"), 8, 10),
    Task("mnli", 3, "accuracy", ("premise", "hypothesis"),
         TsvLayout("MNLI", "sentence1", "gold_label", text_b="sentence2", dev_file="dev_matched.tsv",
                   label_map=_NLI3), 32, 5, hub_dev="validation_matched"),
    Task("qnli", 2, "accuracy", ("question", "sentence"),
         TsvLayout("QNLI", "question", "label", text_b="sentence", label_map=_NLI2), 32, 10),
    Task("rte", 2, "accuracy", ("sentence1", "sentence2"),
         TsvLayout("RTE", "sentence1", "label", text_b="sentence2", label_map=_NLI2), 8, 10),
    Task("wnli", 2, "accuracy", ("sentence1", "sentence2"),
         TsvLayout("WNLI", "sentence1", "label", text_b="sentence2"), 8, 10),
    # SICK-R relatedness (Marelli et al. 2014) in STS-B's columns: <dir>/SICK-R/{train,test}.tsv, local only.
    # Its trial set stays unused: --split-dev holds out a tenth of train, and test.tsv is what is reported.
    Task("sickr", 1, "pearson", ("sentence1", "sentence2"),
         TsvLayout("SICK-R", "sentence1", "score", text_b="sentence2", dev_file="test.tsv"), 8, 10, hub_dev=""),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


# --- data ---------------------------------------------------------------------------------------


@dataclass
class Splits:
    """``train`` to fit, ``eval`` to report on, ``dev`` (with --split-dev) to select the epoch."""

    train: "datasets.Dataset"
    eval: "datasets.Dataset"
    dev: Optional["datasets.Dataset"] = None
    source: str = ""
    sizes: Dict[str, int] = field(default_factory=dict)


def load_splits(task: Task, data_dir: Optional[str] = None, split_dev: bool = False,
                max_train_samples: Optional[int] = None, max_eval_samples: Optional[int] = None) -> Splits:
    """Train and evaluation sets of ``task``, from ``data_dir`` (GLUE TSV layout) or the hub.

    Without ``split_dev`` the model is evaluated on the official dev set. With it, the
    LEFT paper's protocol: the training set is split 9:1 into train and dev (the same
    split for every seed), and the official dev set becomes the test set.
    ``max_*_samples`` take a fixed random subset (the same for every seed).
    """
    if data_dir is not None:
        train, official_dev, standard = _load_tsv(task, Path(data_dir))
        source = str(Path(data_dir) / task.tsv.folder)
    else:
        train, official_dev, standard = _load_hub(task)
        source = f"hub nyu-mll/glue/{task.name}"
    # split and subsample the raw rows first: only the rows used are converted
    dev = None
    if split_dev:
        parts = train.train_test_split(test_size=0.1, seed=SPLIT_SEED)
        train, dev = parts["train"], standard(_subset(parts["test"], max_eval_samples))
    train = standard(_subset(train, max_train_samples))
    evaluation = standard(_subset(official_dev, max_eval_samples))
    for name, ds in (("train", train), ("evaluation", evaluation), ("dev", dev)):
        if ds is not None and len(ds) == 0:
            raise ValueError(f"the {name} split of {task.name} ({source}) is empty: nothing to "
                             f"{'train on' if name == 'train' else 'evaluate on'}")
    sizes = {"train": len(train), "eval": len(evaluation)}
    if dev is not None:
        sizes["dev"] = len(dev)
    return Splits(train, evaluation, dev, source, sizes)


def _subset(ds, n: Optional[int]):
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise ValueError(f"a sample limit must be positive, got {n}")
    return ds.shuffle(seed=SUBSAMPLE_SEED).select(range(n))


def _load_tsv(task: Task, data_dir: Path):
    import datasets

    layout = task.tsv
    folder = data_dir / layout.folder
    files = {"train": folder / "train.tsv", "dev": folder / layout.dev_file}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"GLUE {task.name} files not found: {', '.join(missing)} (expected the GLUE layout "
                                f"<data-dir>/{layout.folder}/train.tsv and {layout.dev_file})")
    for path in files.values():  # datasets would fail on these with errors that do not name the file
        _check_tsv_head(path, layout)
    kwargs = dict(delimiter="\t", quoting=csv.QUOTE_NONE, encoding="utf-8-sig", keep_default_na=False)
    if layout.columns is not None:
        kwargs.update(column_names=list(layout.columns), header=None)
    raw = datasets.load_dataset("csv", data_files={k: str(v) for k, v in files.items()}, **kwargs)
    convert = _label_converter(task)

    def standard(row):
        out = {"text_a": str(row[layout.text_a]), "label": convert(row[layout.label])}
        if layout.text_b is not None:
            out["text_b"] = str(row[layout.text_b])
        return out

    return raw["train"], raw["dev"], lambda ds: _standardise(ds, standard, task)


def _check_tsv_head(path: Path, layout: TsvLayout) -> None:
    """The file has its header (with the task's columns) and at least one example; ValueError otherwise."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        head = [f.readline().rstrip("\r\n") for _ in range(2)]
    needed = [c for c in (layout.text_a, layout.text_b, layout.label) if c is not None]
    if layout.columns is not None:  # header-less (CoLA): check the field count of the first example
        if not head[0]:
            raise ValueError(f"{path} is empty: it needs one example per line, {len(layout.columns)} tab-separated "
                             f"fields ({', '.join(layout.columns)})")
        if len(head[0].split("\t")) != len(layout.columns):
            raise ValueError(f"{path}: the first line has {len(head[0].split(chr(9)))} tab-separated fields, "
                             f"expected {len(layout.columns)} ({', '.join(layout.columns)}; this file has no header)")
        return
    if not head[0]:
        raise ValueError(f"{path} is empty: it needs a header line naming the tab-separated columns "
                         f"({', '.join(needed)}) and one example per line")
    header = head[0].split("\t")
    absent = [c for c in needed if c not in header]
    if absent:
        raise ValueError(f"{path}: the header line {header} lacks column(s) {absent}; the first line must name the "
                         f"tab-separated columns, including {', '.join(needed)}")
    if not head[1]:
        raise ValueError(f"{path} has a header but no examples (the dataset is empty)")


def _label_converter(task: Task) -> Callable:
    layout = task.tsv
    if task.is_regression:
        return _number(task, float)
    if layout.label_map is None:
        return _number(task, int)

    def convert(value):
        if value not in layout.label_map:
            raise ValueError(f"{task.name}: unknown label {value!r}; expected one of {sorted(layout.label_map)}")
        return layout.label_map[value]

    return convert


def _number(task: Task, kind: type) -> Callable:
    def convert(value):
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{task.name}: label {value!r} is not a{'' if kind is float else 'n'} "
                             f"{kind.__name__}; {_label_range(task)}") from None

    return convert


def _label_range(task: Task) -> str:
    if task.is_regression:
        return f"{task.name} labels are finite real numbers (a similarity score)"
    return f"{task.name} labels are the integers 0..{task.num_labels - 1}"


def _check_label(task: Task, label, index: int) -> None:
    ok = math.isfinite(label) if task.is_regression else (isinstance(label, int) and 0 <= label < task.num_labels)
    if not ok:
        raise ValueError(f"{task.name}: label {label!r} of example {index} is outside the task's range: "
                         f"{_label_range(task)}")


def _load_hub(task: Task):
    import datasets

    if not task.hub_dev:
        raise DataUnavailable(f"{task.name} has no hub source here: pass --data-dir with "
                              f"<dir>/{task.tsv.folder}/train.tsv and {task.tsv.dev_file}")
    try:
        raw = datasets.load_dataset("nyu-mll/glue", task.name)
    except Exception as exc:  # offline, no such repo, network error: all mean "use local files"
        raise DataUnavailable(f"could not load GLUE {task.name} from the hub (nyu-mll/glue): {type(exc).__name__}: "
                              f"{exc}. Offline? Pass --data-dir with the GLUE TSV files "
                              f"(<dir>/{task.tsv.folder}/train.tsv), or leave out --task for the embedded demo"
                              ) from exc

    def standard(row):
        out = {"text_a": row[task.hub_text[0]], "label": row["label"]}
        if task.is_pair:
            out["text_b"] = row[task.hub_text[1]]
        return out

    return raw["train"], raw[task.hub_dev], lambda ds: _standardise(ds, standard, task)


def _standardise(ds, fn, task: Task):
    import datasets

    features = {"text_a": datasets.Value("string"),
                "label": datasets.Value("float32" if task.is_regression else "int64")}
    if task.is_pair:
        features["text_b"] = datasets.Value("string")

    def checked(row, index):
        out = fn(row)
        _check_label(task, out["label"], index)  # out of range here, or an obscure error deep in the loss later
        return out

    return ds.map(checked, with_indices=True, remove_columns=ds.column_names, features=datasets.Features(features))


# --- metrics (no `evaluate` dependency) -----------------------------------------------------------


def accuracy(preds: Sequence, labels: Sequence) -> float:
    _same_length(preds, labels)
    return sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)


def matthews(preds: Sequence, labels: Sequence) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K, as scikit-learn computes it)."""
    _same_length(preds, labels)
    classes = sorted(set(labels) | set(preds))
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    conf = [[0] * k for _ in range(k)]
    for p, y in zip(preds, labels):
        conf[index[y]][index[p]] += 1
    n = len(labels)
    correct = sum(conf[i][i] for i in range(k))
    true_count = [sum(conf[i]) for i in range(k)]
    pred_count = [sum(conf[i][j] for i in range(k)) for j in range(k)]
    cov_yp = correct * n - sum(t * p for t, p in zip(true_count, pred_count))
    cov_yy = n * n - sum(t * t for t in true_count)
    cov_pp = n * n - sum(p * p for p in pred_count)
    if cov_yy == 0 or cov_pp == 0:
        return 0.0  # a constant prediction or a single class: defined as 0, as scikit-learn does
    return cov_yp / math.sqrt(cov_yy * cov_pp)


def pearson(preds: Sequence, labels: Sequence) -> float:
    _same_length(preds, labels)
    n = len(labels)
    mp, my = sum(preds) / n, sum(labels) / n
    sxy = sum((p - mp) * (y - my) for p, y in zip(preds, labels))
    sxx = sum((p - mp) ** 2 for p in preds)
    syy = sum((y - my) ** 2 for y in labels)
    if sxx == 0 or syy == 0:
        return 0.0  # constant predictions carry no correlation
    return sxy / math.sqrt(sxx * syy)


def _same_length(preds: Sequence, labels: Sequence) -> None:
    if len(preds) != len(labels) or not labels:
        raise ValueError(f"need as many predictions as labels, and at least one: got {len(preds)} and {len(labels)}")


METRICS: Dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy, "matthews": matthews, "pearson": pearson,
}


def score(task: Task, preds: List, labels: List) -> float:
    return METRICS[task.metric](preds, labels)


__all__ = ["DataUnavailable", "Task", "TsvLayout", "TASKS", "get_task", "Splits", "load_splits", "accuracy", "matthews", "pearson",
           "METRICS", "score"]
