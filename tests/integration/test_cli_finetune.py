"""`peftkern finetune` end to end on a tiny random BERT (with MiniLM's tokenizer) and a tiny TSV task."""
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

import peftkern
from peftkern.app import cli, data, glue, train
from peftkern.methods import registry
from tests.helpers.data import NEGATIVE, POSITIVE, save_tiny_bert, write_sst2_like  # noqa: F401


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"model": str(save_tiny_bert(root / "model")), "data": str(write_sst2_like(root / "glue"))}


def finetune_args(tiny, out, *extra):
    return ["finetune", "--model", tiny["model"], "--task", "sst2", "--data-dir", tiny["data"], "--method", "lora",
            "--rank", "4", "--epochs", "2", "--batch-size", "8", "--lr", "5e-3", "--max-length", "16",
            "--output-dir", str(out), "--no-progress", *extra]


def test_finetune_writes_adapter_metrics_and_plot(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(finetune_args(tiny, out, "--seed", "7")) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "±" in printed
    for name in ("peftkern_config.json", "peftkern_model.safetensors", "metrics.json", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy" and metrics["seed"] == 7 and len(metrics["epochs"]) == 2
    assert metrics["sizes"] == {"train": 48, "eval": 24}
    assert len(metrics["step_losses"]) == 2 * math.ceil(48 / 8)
    assert 0.0 <= metrics["value"] <= 1.0 and f"{metrics['value']:.4f}" in printed
    # the saved adapter reproduces the reported metric on a freshly loaded model
    task = glue.get_task("sst2")
    tokenizer, model, _ = train.load_model(tiny["model"], task)
    with torch.no_grad():  # the head is restored from the adapter file, whatever it was initialised to
        model.classifier.weight.normal_()
    peftkern.load(model, out)
    splits = glue.load_splits(task, tiny["data"])
    loader = data.eval_loader(tokenizer, data.encode(tokenizer, splits.eval, 16), 64)
    assert train.evaluate(model, loader, task)["metric"] == pytest.approx(metrics["value"], abs=1e-9)


def _run(tiny, out, seed):
    args = cli.build_parser().parse_args(finetune_args(tiny, out, "--seed", str(seed), "--epochs", "1"))
    return train.finetune(cli.run_config(args))


def test_same_seed_same_run(tiny, tmp_path):
    a, b = _run(tiny, tmp_path / "a", 3), _run(tiny, tmp_path / "b", 3)
    assert a.value == b.value and a.step_losses == b.step_losses and a.epochs == b.epochs


def test_seeds_report_mean_and_std(tiny, tmp_path, capsys):
    out = tmp_path / "multi"
    assert cli.main(finetune_args(tiny, out, "--seeds", "1,2", "--option", "train=AB")) == 0
    summary = json.loads((out / "summary.json").read_text())
    runs = [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in (1, 2)]
    values = [r["value"] for r in runs]
    assert runs[0]["step_losses"] != runs[1]["step_losses"], "a different seed must give a different run"
    assert summary["seeds"] == [1, 2] and summary["values"] == values
    assert summary["mean"] == pytest.approx(sum(values) / 2)
    assert summary["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))  # sample std, n - 1
    assert (out / "curves.png").is_file() and (out / "seed-2" / "peftkern_model.safetensors").is_file()
    assert f"{summary['mean']:.4f} ± {summary['std']:.4f}" in capsys.readouterr().out


def test_split_dev_selects_on_held_out_train(tiny, tmp_path):
    out = tmp_path / "split"
    assert cli.main(finetune_args(tiny, out, "--split-dev", "--max-train-samples", "40")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["sizes"] == {"train": 40, "dev": 5, "eval": 24}  # 48 -> 43 + 5 (9:1), then 40 of the 43
    chosen = max(m["epochs"], key=lambda e: e["dev_metric"])
    assert m["config"]["chosen_epoch"] == chosen["epoch"] and m["value"] == chosen["eval_metric"]


def test_short_budget_by_default_paper_budget_on_request_and_demo_defaults():
    short = cli.run_config(cli.build_parser().parse_args(["finetune", "--task", "mnli", "--data-dir", "x"]))
    short = short.resolved()
    spec = registry.get("pg_pos")
    assert (short.lr, short.lr_source) == (spec.lr.demo, spec.lr.demo_source)  # the short budget's own rate
    assert (short.epochs, short.batch_size, short.max_length, short.group_by_length) == \
        (cli.SHORT["epochs"], cli.SHORT["batch_size"], cli.SHORT["max_length"], True)
    paper = cli.run_config(cli.build_parser().parse_args(["finetune", "--task", "mnli", "--data-dir", "x",
                                                          "--budget", "paper"])).resolved()
    assert (paper.lr, paper.weight_decay, tuple(paper.betas), paper.rank, paper.max_length) == \
        (5e-5, 0.01, (0.9, 0.999), 8, 128)
    assert paper.alpha is None and paper.lr_source == "LEFT Table 6"  # pg_pos's own: LEFT's rate, alpha 16
    assert (paper.batch_size, paper.epochs, paper.seed, paper.method) == (32, 5, 100, "pg_pos")
    tied = cli.run_config(cli.build_parser().parse_args(["finetune", "--task", "mrpc", "--data-dir", "x",
                                                         "--method", "tied_lora", "--budget", "paper"]))
    assert tied.lr == 1e-4 and "Tied-LoRA" in tied.lr_source  # each method's paper rate
    rte = cli.run_config(cli.build_parser().parse_args(["finetune", "--task", "rte", "--data-dir", "x",
                                                        "--budget", "paper"])).resolved()
    assert (rte.batch_size, rte.epochs) == (8, 10)
    demo = cli.run_config(cli.build_parser().parse_args(["finetune", "--lr", "1e-4"]))
    assert demo.data_dir == train.embedded_data_dir() and demo.task == "sst2"
    assert demo.model == train.default_model() and demo.lr == 1e-4  # a flag beats the demo's default
    assert demo.lr_source == "--lr"
    assert (demo.epochs, demo.batch_size, demo.max_length) == (cli.DEMO["epochs"], cli.DEMO["batch_size"],
                                                               cli.DEMO["max_length"])
    assert demo.group_by_length and not paper.group_by_length


@pytest.mark.parametrize("text,value", [("8", 8), ("0.1", 0.1), ("true", True), ("False", False), ("none", None),
                                        ("AB", "AB"), ("1e-3", 1e-3)])
def test_option_values_are_typed(text, value):
    parsed = cli.parse_options([f"k={text}"])["k"]
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--method", "nope"], "unknown method 'nope'; valid methods"),
    (["finetune", "--task", "squad", "--data-dir", "x"], "invalid choice: 'squad' (choose from 'cola'"),
    (["finetune", "--method", "lora", "--option", "bogus=1"], "does not take option"),
    (["finetune", "--method", "lora", "--option", "r=4"], "PEFT's r= is --rank"),
    (["finetune", "--option", "novalue"], "KEY=VALUE"),
    (["finetune", "--task", "mrpc", "--data-dir", "/nonexistent", "--method", "lora"], "MRPC/train.tsv"),
    (["finetune", "--seeds", "1,1"], "distinct"),
    (["finetune", "--seeds", ""], "--seeds needs distinct integers, got ''"),  # was: seed 100, silently
    # a negative head rate trained the head by gradient ascent; inf and nan stopped at step 2 (a review's findings)
    (["finetune", "--head-lr", "-1"], "--head-lr must be a real number in (0, inf), got -1.0"),
    (["finetune", "--head-lr", "nan"], "--head-lr must be a real number"),
    (["finetune", "--lr", "inf"], "--lr must be a real number in (0, inf), got inf"),
    (["finetune", "--weight-decay", "inf"], "--weight-decay must be a real number in [0, inf)"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys, tmp_path):
    try:
        code = cli.main(argv + ["--output-dir", str(tmp_path), "--no-progress"])
    except SystemExit as exit:  # argparse's own (a choice outside the flag's choices): its usage line and exit 2
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_model_directory_without_a_tokenizer_is_named(tiny, tmp_path, capsys):
    model = tmp_path / "no_tokenizer"
    model.mkdir()
    for f in ("config.json", "model.safetensors"):
        (model / f).write_bytes((Path(tiny["model"]) / f).read_bytes())
    argv = finetune_args(tiny, tmp_path / "run")
    argv[argv.index("--model") + 1] = str(model)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "the directory has no tokenizer" in err and "tokenizer.save_pretrained" in err


def test_methods_and_params_commands(capsys):
    assert cli.main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert all(m in listed for m in peftkern.methods())
    assert cli.main(["params", "--method", "vera", "--rank", "4"]) == 0
    table = capsys.readouterr().out
    assert "vera (rank 4" in table and "adapter parameters trained" in table


def test_python_dash_m_entry_point(monkeypatch, capsys):
    """`python -m peftkern methods` (run in-process: a subprocess would re-import torch for seconds)."""
    monkeypatch.setattr(sys, "argv", ["peftkern", "methods"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("peftkern", run_name="__main__")
    assert done.value.code == 0 and "lora" in capsys.readouterr().out


def test_modules_missing_from_the_checkpoint_are_trained_and_saved(tmp_path):
    """A checkpoint without BERT's pooler (sentence-transformers style): the random pooler is trained
    with the head rather than left frozen at random values, and saved with it."""
    tokenizer = T.AutoTokenizer.from_pretrained(train.default_model(), local_files_only=True)
    cfg = T.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64)
    T.BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    _, model, fresh = train.load_model(str(tmp_path / "model"), glue.get_task("sst2"))
    assert "bert.pooler.dense" in fresh and "classifier" in fresh
    peftkern.patch(model, "lora", rank=2)
    assert not model.bert.pooler.dense.weight.requires_grad  # patch keeps only the head trainable, as PEFT
    assert train.train_fresh_modules(model, fresh) == ["bert.pooler.dense"]
    assert model.bert.pooler.dense.weight.requires_grad and model.classifier.weight.requires_grad
    peftkern.save(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "peftkern_config.json").read_text())["heads"]
    assert saved == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]


def test_hub_unreachable_says_what_to_do(monkeypatch, capsys, tmp_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert cli.main(["finetune", "--task", "rte", "--method", "lora", "--output-dir", str(tmp_path),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not load GLUE rte from the hub" in err and "--data-dir" in err and "RTE/train.tsv" in err


def test_length_grouped_batches_cover_every_example_once_per_epoch():
    lengths = [1 + (i * 7) % 23 for i in range(203)]
    sampler = data.LengthGroupedBatches(lengths, batch_size=8, seed=0)
    epochs = [list(sampler), list(sampler)]
    for batches in epochs:
        assert len(batches) == len(sampler) == 26
        assert sorted(i for b in batches for i in b) == list(range(203))
    assert epochs[0] != epochs[1], "each epoch draws a new order"
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epochs[0]) / 26
    assert spread < 5  # similar lengths in a batch (random batches of 8 spread over about 18 here)
    again = data.LengthGroupedBatches(lengths, batch_size=8, seed=0)
    assert list(again) == epochs[0]  # seeded
