"""`peftkern finetune` launched by torchrun (2 CPU processes, gloo) trains the same run as one process.

The tiny BERT has no dropout, so both runs compute the same function of the same global batches:
the data is sharded per global batch (``distributed.ShardedBatches``), DDP averages gradients,
and 41 training examples in batches of 8 end each epoch with a batch of 1, which rank 1 receives
with loss weight 0. Only rank 0 prints and writes.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from peftkern.app import checkpoint, cli, train
from tests.helpers.data import write_sst2_like
from tests.helpers.dist import free_port

N_TRAIN, BATCH, EPOCHS = 41, 8, 2


def save_tiny_bert_without_dropout(path):
    tokenizer = T.AutoTokenizer.from_pretrained(train.default_model(), local_files_only=True)
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    T.BertModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def args(model, data, out, method):
    return ["finetune", "--model", model, "--task", "sst2", "--data-dir", data, "--method", method, "--rank", "4",
            "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", "5e-3", "--max-length", "16",
            "--output-dir", str(out), "--no-progress", "--seed", "5", "--save-every", "5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    model = save_tiny_bert_without_dropout(root / "model")
    data = str(write_sst2_like(root / "glue", n_train=N_TRAIN, n_dev=12))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "peftkern", *args(model, data, root / "ddp", "pg_pos")],
        env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert cli.main(args(model, data, root / "single", "pg_pos")) == 0
    return root, launched


def test_only_rank_zero_prints_and_writes(runs):
    root, launched = runs
    assert launched.stdout.count("peftkern finetune:") == 1 and "2 processes" in launched.stdout
    assert launched.stdout.count("adapter, metrics.json and curves.png in") == 1
    metrics = json.loads((root / "ddp" / "metrics.json").read_text())
    assert metrics["config"]["processes"] == 2
    # one checkpoint (the last kept), written once, with both ranks' RNG states
    found = checkpoint.complete(root / "ddp" / checkpoint.FOLDER)
    steps = EPOCHS * -(-N_TRAIN // BATCH)
    assert [p.name for p in found] == [f"step-{steps - steps % 5:08d}"]
    loaded = checkpoint.read(found[0])
    assert loaded.manifest["world_size"] == 2 and len(loaded.trainer["rng"]) == 2


def test_two_processes_train_what_one_process_trains(runs):
    root, _ = runs
    ddp, single = (json.loads((root / d / "metrics.json").read_text()) for d in ("ddp", "single"))
    assert len(ddp["step_losses"]) == len(single["step_losses"]) == EPOCHS * -(-N_TRAIN // BATCH)
    torch.testing.assert_close(torch.tensor(ddp["step_losses"]), torch.tensor(single["step_losses"]),
                               rtol=1e-4, atol=1e-5)
    assert ddp["sizes"] == single["sizes"]
    for a, b in zip(ddp["epochs"], single["epochs"]):
        assert a["eval_metric"] == b["eval_metric"]  # every prediction gathered from both ranks
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
    tensors = [load_file(root / d / "peftkern_model.safetensors") for d in ("ddp", "single")]
    assert tensors[0].keys() == tensors[1].keys()
    for k in tensors[0]:
        torch.testing.assert_close(tensors[0][k], tensors[1][k], rtol=1e-4, atol=1e-5, msg=k)
