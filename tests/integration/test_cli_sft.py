"""`peftkern finetune --task sft`: instruction data through TRL's SFTTrainer on a local causal LM, with
the outputs of the GLUE runs (adapter, metrics.json, curves.png); a bad file or a flag of the other
task kind is one clear line, before any model is loaded."""
import json

import pytest

from peftkern.app import cli
from tests.helpers.data import save_tiny_llama, write_arithmetic_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return {"model": str(save_tiny_llama(root / "model")), "prompt": str(write_arithmetic_jsonl(root / "p.jsonl")),
            "chat": str(write_arithmetic_jsonl(root / "c.jsonl", form="messages", seed=1))}


def _args(tiny, data, out, *extra):
    return ["finetune", "--task", "sft", "--data", tiny[data], "--model", tiny["model"], "--method", "lora",
            "--rank", "4", "--batch-size", "4", "--max-length", "64", "--lr", "1e-2", "--precision", "fp32",
            "--output-dir", str(out), "--no-progress", *extra]


@pytest.mark.parametrize("data", ["prompt", "chat"])
def test_sft_writes_the_adapter_metrics_and_curves(tiny, tmp_path, capsys, data):
    out = tmp_path / "run"
    assert cli.main(_args(tiny, data, out, "--eval-generate", "--max-new-tokens", "6")) == 0
    assert {f.name for f in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                               "peftkern_model.safetensors", "metrics.json", "curves.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    scores = metrics["config"]["metrics"]
    assert metrics["task"] == "sft" and metrics["metric"] == "eval_loss" and metrics["value"] == scores["eval_loss"]
    assert scores["perplexity"] > 1 and {"exact_match", "token_f1", "final_answer_accuracy"} <= set(scores)
    assert metrics["sizes"] == {"train": 36, "eval": 4} and metrics["config"]["precision"] == "fp32"
    assert len(metrics["step_losses"]) == 9 and metrics["epochs"][0]["epoch"] == 1
    printed = capsys.readouterr().out
    assert "learning rate 0.01 (--lr)" in printed and "final_answer_accuracy" in printed


def test_sft_without_a_learning_rate_takes_the_methods_sft_rate_and_learns(tiny, tmp_path, capsys):
    from peftkern.methods import registry

    out = tmp_path / "run"
    argv = [a for a in _args(tiny, "prompt", out, "--method", "pg_pos") if a not in ("--lr", "1e-2")]
    assert cli.main(argv) == 0
    rate, source = registry.default_lr("pg_pos", "sft")
    assert f"learning rate {rate:g} ({source})" in capsys.readouterr().out
    losses = json.loads((out / "metrics.json").read_text())["step_losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_sft_on_a_4bit_base_trains_the_adapter_and_saves_a_qlora_adapter(tiny, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from peft import PeftConfig

    out = tmp_path / "run"
    assert cli.main(_args(tiny, "prompt", out, "--load-in-4bit", "--use-dora")) == 0
    printed = capsys.readouterr().out
    assert "with lora + DoRA on" in printed and "(4-bit nf4, bitsandbytes)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["load_in_4bit"] == "nf4"
    losses = metrics["step_losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the adapter learns on the 4-bit base
    config = PeftConfig.from_pretrained(out)
    assert config.use_dora and config.r == 4


@pytest.mark.parametrize("line,words", [("{oops", ":3: not valid JSON"), ('{"prompt": "q"}', "'completion' is missing")])
def test_a_bad_file_is_one_line_naming_it_and_nothing_is_trained(tiny, tmp_path, capsys, line, words):
    bad = tmp_path / "bad.jsonl"
    good = open(tiny["prompt"]).read().splitlines()[:2]
    bad.write_text("\n".join(good + [line]) + "\n")
    out = tmp_path / "run"
    assert cli.main(_args({**tiny, "bad": str(bad)}, "bad", out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "prompt" in err and "messages" in err
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--task", "sft"], "--task sft needs --data"),
    (["finetune", "--task", "sft", "--data", "x.jsonl", "--split-dev"], "--split-dev applies to"),
    (["finetune", "--task", "sst2", "--data-dir", "x", "--eval-generate"], "--eval-generate applies to --task sft"),
    (["finetune", "--task", "sft", "--data", "missing.jsonl"], "missing.jsonl: no such file"),
    (["finetune", "--model", "/nonexistent/model"], "--model /nonexistent/model: no such file or directory"),
    (["finetune", "--targets-regex", "["], "--targets-regex '[' is not a valid regular expression"),
    (["finetune", "--rank", "0"], "--rank must be a positive integer, got 0"),
    (["finetune", "--task", "sst2", "--load-in-4bit"], "--load-in-4bit applies to --task sft"),
    (["finetune", "--task", "sft", "--data", "x.jsonl", "--lr", "inf"], "--lr must be a real number in (0, inf)"),
    (["finetune", "--task", "sft", "--data", "x.jsonl", "--targets", "q_proj,lm_head"], "--targets lm_head: TRL's SFT"),
])
def test_bad_flags_are_named_before_anything_loads(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_diverged_run_stops_with_exit_code_3_and_saves_nothing(tiny, tmp_path, capsys, monkeypatch):
    """TRL's loop has no NaN/Inf check: a run whose adapter diverged reported a NaN loss, exited 0 and
    saved an adapter of NaNs (a review's finding). It now stops as the GLUE runs do. The divergence is
    made, not hoped for: a learning rate of 1e30 left the adapter huge but finite with some package
    versions (B at 2.8e30, the loss flat at ln V), and the run then rightly saved."""
    import torch
    import trl

    train = trl.SFTTrainer.train

    def diverging(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        with torch.no_grad():  # what a diverged step leaves
            next(p for p in self.model.parameters() if p.requires_grad).fill_(float("nan"))
        return result

    monkeypatch.setattr(trl.SFTTrainer, "train", diverging)
    out = tmp_path / "run"
    assert cli.main(_args(tiny, "prompt", out)) == 3
    assert "training stopped" in capsys.readouterr().err
    assert not (out / "adapter_model.safetensors").exists() and not (out / "peftkern_model.safetensors").exists()


@pytest.mark.parametrize("flag", [False, True])
def test_gradient_checkpointing_follows_the_flag(tiny, tmp_path, monkeypatch, flag):
    """TRL's config checkpoints by default: without the flag every run checkpointed while metrics.json
    said it did not (a review's finding)."""
    import trl

    seen = []
    step = trl.SFTTrainer.training_step

    def spy(self, *args, **kwargs):
        seen.append(bool(self.model.is_gradient_checkpointing))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "training_step", spy)
    out = tmp_path / "run"
    assert cli.main(_args(tiny, "prompt", out, "--max-train-samples", "8", *(["--gradient-checkpointing"] if flag else []))) == 0
    assert seen and set(seen) == {flag}
    assert json.loads((out / "metrics.json").read_text())["config"]["gradient_checkpointing"] is flag


@pytest.mark.parametrize("flag", ["--max-train-samples", "--max-eval-samples"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_sample_limits_must_be_positive(tiny, tmp_path, capsys, flag, value):
    """0 crashed after the model loaded; a negative one silently dropped examples from the end."""
    assert cli.main(_args(tiny, "prompt", tmp_path / "run", flag, value)) == 2
    assert f"{flag.lstrip('-').replace('-', '_')} must be positive" in capsys.readouterr().err


def test_adaloras_regulariser_joins_trls_training_loss_and_not_its_eval_loss():
    """TRL computes its loss from per-token log-probabilities, not from the model's loss where a forward
    hook adds AdaLoRA's orthogonality term, so the CLI's SFT runs trained without it (a review's finding)."""
    import torch

    import peftkern
    from peftkern.app import sft
    from tests.helpers.models import tiny_model

    class Base:
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return (torch.tensor(1.0), "outputs") if return_outputs else torch.tensor(1.0)

    model = peftkern.patch(tiny_model("llama"), "adalora", total_step=10)
    reg = peftkern.orthogonal_regularization(model).detach()
    assert reg > 0
    trainer = sft._regularized(Base)()
    model.train()
    torch.testing.assert_close(trainer.compute_loss(model, {}).detach(), 1.0 + reg)
    loss, outputs = trainer.compute_loss(model, {}, return_outputs=True)
    torch.testing.assert_close(loss.detach(), 1.0 + reg)
    assert outputs == "outputs"
    model.eval()
    assert trainer.compute_loss(model, {}).item() == 1.0
    # the Trainer hands over the model it wrapped for DDP (a review's finding: every torchrun SFT run
    # stopped at its first step, "not patched"); DataParallel stands in for that wrapper here
    model.train()
    torch.testing.assert_close(trainer.compute_loss(torch.nn.DataParallel(model), {}).detach(), 1.0 + reg)


def test_a_max_length_that_leaves_no_completion_is_named(tiny, tmp_path, capsys):
    """Every completion truncated away: TRL failed with an opaque sampler error, or, packed, reported a loss
    of 0 and a perplexity of 1 and exited 0 (a review's finding)."""
    argv = [a if a != "64" else "4" for a in _args(tiny, "prompt", tmp_path / "run", "--packing")]
    assert cli.main(argv) == 2
    assert "--max-length 4 leaves no completion token in any training example" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_backend_that_cannot_run_here_is_named_before_anything_loads(tiny, tmp_path, capsys, monkeypatch):
    """--backend triton on a CPU without the interpreter died at the first training step with a traceback,
    after the model had loaded (a review's finding): one line now, naming the backends that run here."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(_args(tiny, "prompt", tmp_path / "run", "--backend", "triton")) == 2
    err = capsys.readouterr().err
    assert "--backend triton cannot run on this machine's cpu" in err and "backends that run here: auto, cpp, torch" in err
    assert not (tmp_path / "run").exists()


def test_sft_checkpoints_and_a_killed_run_resumes_exactly(tiny, tmp_path, caplog, monkeypatch):
    """--save-every and --resume applied to classification runs only (a review's finding: a long SFT run had
    no way back after a kill). The Trainer's checkpoints now: a run killed after its step-4 checkpoint and
    resumed ends with the adapter of the run that was not killed, bit for bit; with no checkpoint yet,
    --resume starts at step 0."""
    import logging

    import torch
    import trl
    from safetensors.torch import load_file

    full = tmp_path / "full"
    assert cli.main(_args(tiny, "prompt", full, "--save-every", "4")) == 0
    assert [c.name for c in full.glob("checkpoint-*")] == ["checkpoint-9"]  # the last one kept (9 steps)

    class Killed(Exception):
        pass

    step, calls = trl.SFTTrainer.training_step, []

    def killed_at_the_sixth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise Killed
        return step(self, *args, **kwargs)

    run = tmp_path / "killed"
    with monkeypatch.context() as m:
        m.setattr(trl.SFTTrainer, "training_step", killed_at_the_sixth)
        with pytest.raises(Killed):
            cli.main(_args(tiny, "prompt", run, "--save-every", "4"))
    assert {f.name for f in (run / "checkpoint-4").iterdir()} >= {"peftkern_run.json", "trainer_state.json"}
    (run / "checkpoint-8").mkdir()  # and a later save killed part way (no trainer_state.json, written last)
    (run / "checkpoint-8" / "adapter_model.safetensors").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="peftkern"):
        assert cli.main(_args(tiny, "prompt", run, "--save-every", "4", "--resume")) == 0
    assert "skipping" in caplog.text and "checkpoint-8, a save killed part way" in caplog.text
    want, got = load_file(str(full / "peftkern_model.safetensors")), load_file(str(run / "peftkern_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with caplog.at_level(logging.WARNING, logger="peftkern"):
        assert cli.main(_args(tiny, "prompt", tmp_path / "fresh", "--resume")) == 0
    assert "no checkpoint in" in caplog.text


def test_resuming_with_other_settings_is_refused_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch):
    """The Trainer restores its scheduler (the old learning rate) and data order whatever this run asks, so a
    resume under other settings would train one run and report another: refused, naming the settings; so
    are the data file changed in place, another number of processes, and a classification run's folder
    (a review's findings). A path given another way is the same path."""
    import shutil

    from peftkern.app import models, sft

    data = tmp_path / "data.jsonl"
    shutil.copy(tiny["prompt"], data)
    local = {**tiny, "copy": str(data)}
    out = tmp_path / "run"
    assert cli.main(_args(local, "copy", out, "--save-every", "4")) == 0
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("the model loaded"))

    def refused(argv, message):
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err

    refused([a if a != "1e-2" else "5e-2" for a in _args(local, "copy", out, "--resume")],
            "was written by a different run (lr: checkpoint 0.01, this run 0.05)")
    with monkeypatch.context() as m:
        m.setenv("WORLD_SIZE", "2")
        refused(_args(local, "copy", out, "--resume"), "world_size: checkpoint 1, this run 2")
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as m:  # the same file named relatively resumes (the model would load: stop there)
        m.setattr(models, "load_causal_lm", lambda *a, **k: (_ for _ in ()).throw(ValueError("reached the model")))
        refused(_args({**local, "copy": "data.jsonl"}, "copy", out, "--resume"), "reached the model")
    data.write_text("\n".join(reversed(data.read_text().splitlines())) + "\n")  # the same path, other data
    refused(_args(local, "copy", out, "--resume"), "data_sha256")
    (tmp_path / "glue" / "checkpoints").mkdir(parents=True)
    refused(_args(local, "copy", tmp_path / "glue", "--resume"), "holds a classification run's checkpoints")
    with pytest.raises(ValueError, match="resume and save_every need an output directory"):
        sft.SFTConfig(data=str(data), save_every=4).resolved()


def test_a_run_that_does_not_resume_starts_without_an_earlier_runs_checkpoints(tiny, tmp_path):
    out = tmp_path / "run"
    assert cli.main(_args(tiny, "prompt", out, "--save-every", "4")) == 0
    (out / "checkpoint-99").mkdir()  # an earlier, longer run's
    assert cli.main(_args(tiny, "prompt", out, "--save-every", "4")) == 0
    assert [c.name for c in out.glob("checkpoint-*")] == ["checkpoint-9"]
