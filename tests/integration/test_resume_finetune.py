"""`peftkern finetune --resume`: a run interrupted after a checkpoint (by an exception, or by SIGKILL in the
middle of writing the next one) continues to exactly the result of the uninterrupted run.

The tiny BERT keeps its dropout, so the resumed run matches only if the torch RNG state is restored
at the right point; the data order (random batches, or length-grouped ones), the optimizer, the
schedule and AdaLoRA's allocator (scores, step counter, mask) must all be restored as well.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from peftkern.app import checkpoint, cli
from tests.helpers.data import save_tiny_bert, write_sst2_like
from tests.helpers.runs import (  # noqa: F401
    BATCH,
    EPOCHS,
    N_TRAIN,
    SAVE_EVERY,
    Crash,
    assert_same_run,
    crash_after,
    finetune_args,
    outputs,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"model": str(save_tiny_bert(root / "model")), "data": str(write_sst2_like(root / "glue", n_train=N_TRAIN))}


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory):
    """The uninterrupted run of a configuration, run once per module: (metrics, adapter tensors)."""
    done = {}

    def run(method, *extra):
        key = (method, *extra)
        if key not in done:
            out = tmp_path_factory.mktemp("whole")
            assert cli.main(finetune_args(tiny, out, method, *extra)) == 0
            done[key] = outputs(out)
        return done[key]

    return run


CASES = [  # (method, extra flags, the step after which the run dies)
    ("lora", (), 5),  # mid-epoch 1: the checkpoint of step 4 is resumed
    ("lora", (), 6),  # the last step of epoch 1, which is also a checkpoint: saved before the evaluation
    ("pg_pos", ("--group-by-length",), 9),  # epoch 2, length-grouped batches (their own generator)
    ("adalora", ("--option", "tinit=2", "--option", "tfinal=2"), 7),  # during AdaLoRA's budgeting phase
]


@pytest.mark.parametrize("method,extra,dies", CASES, ids=[f"{m}-{d}" for m, _, d in CASES])
def test_resumed_run_equals_uninterrupted(tiny, whole, tmp_path, monkeypatch, method, extra, dies):
    with monkeypatch.context() as patched:
        crash_after(patched, dies)
        with pytest.raises(Crash):
            cli.main(finetune_args(tiny, tmp_path / "cut", method, *extra))
    kept = checkpoint.latest(tmp_path / "cut")
    assert kept is not None and kept.name == f"step-{dies - dies % SAVE_EVERY:08d}"
    assert not (tmp_path / "cut" / "metrics.json").exists()
    if method == "adalora":
        loaded = checkpoint.read(kept)
        assert loaded.manifest["allocator"]["global_step"] > 0
        assert any(k.startswith("allocator.") for k in loaded.tensors)
    assert cli.main(finetune_args(tiny, tmp_path / "cut", method, *extra, "--resume")) == 0
    assert_same_run(outputs(tmp_path / "cut"), whole(method, *extra))
    if method == "adalora":  # the same allocation: the rank pattern is in the saved adapter's config
        cut = json.loads((tmp_path / "cut" / "peftkern_config.json").read_text())
        assert cut["extra"]["rank_pattern"] == {k[len("pattern."):]: v for k, v in whole(method, *extra)[2].items()}
        kept = [k for row in cut["extra"]["rank_pattern"].values() for k in row]
        assert 0 < sum(kept) < len(kept)  # pruning did happen: the allocator state mattered


KILLER = textwrap.dedent("""
    import os, signal, sys
    from peftkern.app import checkpoint, cli
    write, seen = checkpoint._write, []

    def write_then_die(path, data):  # SIGKILL once the second checkpoint's first file is on disk
        digest = write(path, data)
        seen.append(path)
        if len(seen) == 4:  # files: 2 of the first checkpoint, then the first of the second (manifest last)
            os.kill(os.getpid(), signal.SIGKILL)
        return digest

    checkpoint._write = write_then_die
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_killed_mid_save_keeps_the_previous_checkpoint_and_resumes(tiny, whole, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", KILLER, *finetune_args(tiny, out, "lora")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    folder = out / checkpoint.FOLDER
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(checkpoint.TMP_PREFIX)]
    assert len(leftovers) == 1 and leftovers[0].startswith(f"{checkpoint.TMP_PREFIX}step-{2 * SAVE_EVERY:08d}")
    assert [p.name for p in checkpoint.complete(folder)] == [f"step-{SAVE_EVERY:08d}"]
    assert checkpoint.read(checkpoint.latest(out)).manifest["step"] == SAVE_EVERY  # intact: checksums verified
    assert cli.main(finetune_args(tiny, out, "lora", "--resume")) == 0
    assert not [p for p in folder.iterdir() if p.name.startswith(checkpoint.TMP_PREFIX)]  # the next save cleaned up
    assert_same_run(outputs(out), whole("lora"), exact=False)  # two processes: rounding may differ


def test_writer_failure_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    publish, calls = checkpoint._publish, []

    def failing(tmp, final):
        calls.append(final.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return publish(tmp, final)

    monkeypatch.setattr(checkpoint, "_publish", failing)
    with pytest.raises(OSError, match="No space left"):
        cli.main(finetune_args(tiny, out, "lora"))
    folder = out / checkpoint.FOLDER
    assert sorted(p.name for p in folder.iterdir()) == [f"step-{SAVE_EVERY:08d}"]  # no temporary left behind
    assert checkpoint.read(folder / f"step-{SAVE_EVERY:08d}").manifest["step"] == SAVE_EVERY


def test_resume_without_a_checkpoint_starts_at_step_zero(tiny, whole, tmp_path, caplog):
    assert cli.main(finetune_args(tiny, tmp_path / "fresh", "lora", "--resume")) == 0
    assert "no checkpoint" in caplog.text
    assert_same_run(outputs(tmp_path / "fresh"), whole("lora"))


def test_a_misfit_checkpoint_changes_nothing(tiny, tmp_path):
    """restore() checks tensor names and shapes, and the optimizer's, before it writes anything."""
    from peftkern.app import distributed, train

    out = tmp_path / "run"
    assert cli.main(finetune_args(tiny, out, "lora")) == 0
    loaded = checkpoint.read(checkpoint.latest(out))
    config = cli.run_config(cli.build_parser().parse_args(finetune_args(tiny, out, "lora"))).resolved()
    task = train.glue.get_task("sst2")
    _, model, _ = train.load_model(tiny["model"], task)
    import peftkern

    peftkern.patch(model, "lora", rank=2)  # the checkpoint holds rank-4 factors
    optimizer = train.optimizer_for(model, 1e-3, 0.0)
    scheduler = train.linear_schedule(optimizer, 10)
    sampler = distributed.ShardedBatches([[0]], torch.Generator())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint tensor 'state\.groups\.0\.A' has shape \(4, 32\), this model "
                                         r"needs \(2, 32\)"):  # the first misfit in name order
        checkpoint.restore(loaded, config, model, optimizer, scheduler, sampler, distributed.Context())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not optimizer.state and scheduler.last_epoch == 0 and sampler._resume is None
