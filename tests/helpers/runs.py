"""Interrupted and uninterrupted fine-tuning runs through the command line, compared step for step."""
import json

import torch
from safetensors.torch import load_file

from peftkern.app import checkpoint

N_TRAIN, BATCH, EPOCHS, SAVE_EVERY = 44, 8, 2, 2  # 6 steps per epoch, the last batch of 4


class Crash(Exception):
    """Stands in for a preemption: raised by the loop right after a given optimizer step."""


def finetune_args(tiny, out, method, *extra):
    return ["finetune", "--model", tiny["model"], "--task", "sst2", "--data-dir", tiny["data"], "--method", method,
            "--rank", "4", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", "5e-3", "--max-length", "16",
            "--output-dir", str(out), "--no-progress", "--seed", "3", "--save-every", str(SAVE_EVERY), *extra]


def crash_after(monkeypatch, step):
    """Raise Crash once ``step`` optimizer steps are done (after that step's checkpoint, if one is due)."""
    due, save = checkpoint.Checkpointer.due, checkpoint.Checkpointer.save

    def crashing_due(self, done):  # the loop asks after every optimizer step
        if done == step and not due(self, done):
            raise Crash(f"killed after step {step}")
        return due(self, done)

    def crashing_save(self, run):
        written = save(self, run)
        if run.step == step:
            raise Crash(f"killed after the checkpoint of step {step}")
        return written

    monkeypatch.setattr(checkpoint.Checkpointer, "due", crashing_due)
    monkeypatch.setattr(checkpoint.Checkpointer, "save", crashing_save)


def outputs(out):
    """(metrics, adapter tensors, rank pattern as {"pattern.<path>": [kept?]}, empty unless AdaLoRA-style)."""
    metrics = json.loads((out / "metrics.json").read_text())
    extra = json.loads((out / "peftkern_config.json").read_text()).get("extra") or {}
    pattern = {f"pattern.{k}": v for k, v in (extra.get("rank_pattern") or {}).items()}
    return metrics, load_file(out / "peftkern_model.safetensors"), pattern


def assert_same_run(a, b, exact=True):
    (ma, ta, pa), (mb, tb, pb) = a, b
    assert ta.keys() == tb.keys() and pa == pb
    if exact:  # the same process, the same arithmetic: bit for bit
        assert ma["step_losses"] == mb["step_losses"] and ma["epochs"] == mb["epochs"] and ma["value"] == mb["value"]
        assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])]
        return
    torch.testing.assert_close(torch.tensor(ma["step_losses"]), torch.tensor(mb["step_losses"]), rtol=1e-5, atol=1e-6)
    assert [e["eval_metric"] for e in ma["epochs"]] == [e["eval_metric"] for e in mb["epochs"]]
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6, msg=k)
