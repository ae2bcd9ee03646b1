"""Bad input and faults around `peftkern finetune`, load and forward: a clear error, and nothing overwritten.

Covered elsewhere: corrupt / truncated adapter files and configs from another method at
``peftkern.load`` (tests/test_io_faults.py). Here: the same for checkpoints at ``--resume``, NaN
during training (exit code 3, the last good checkpoint kept), device and dtype mismatches at load
and at forward, and GLUE data faults (empty, wrong header, labels out of range).
"""
import hashlib
import json

import pytest
import torch

import peftkern
from peftkern import patching
from peftkern.app import checkpoint, cli
from tests.helpers.data import save_tiny_bert, write_sst2_like
from tests.helpers.models import tiny_model, tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {"model": str(save_tiny_bert(root / "model")), "data": str(write_sst2_like(root / "glue", n_train=16,
                                                                                     n_dev=8))}


def finetune_args(model, data, out, *extra, method="lora"):
    return ["finetune", "--model", model, "--task", "sst2", "--data-dir", str(data), "--method", method, "--rank",
            "2", "--epochs", "2", "--batch-size", "4", "--lr", "5e-3", "--max-length", "16", "--output-dir", str(out),
            "--no-progress", "--seed", "1", "--save-every", "2", *extra]


def fingerprint(folder):
    """Every file under ``folder`` with its content hash (what 'nothing overwritten' compares)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished run: its output directory (adapter, metrics, last checkpoint) is what must survive."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(finetune_args(tiny["model"], tiny["data"], out)) == 0
    return out


def fails(argv, code, message, capsys, keep=None):
    before = fingerprint(keep) if keep is not None else None
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    if keep is not None:
        assert fingerprint(keep) == before
    return err


# --- GLUE data --------------------------------------------------------------------------------------


def write_sst2(root, train_rows, header="sentence\tlabel"):
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("\n".join([header, *train_rows]) + "\n", encoding="utf-8")
    (folder / "dev.tsv").write_text("sentence\tlabel\nfine film\t1\nbad film\t0\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("rows,header,message", [
    ([], "sentence\tlabel", "has a header but no examples (the dataset is empty)"),
    (["a good film\t1"], "text\tlabel", "lacks column(s) ['sentence']"),
    (["a good film\t1", "a bad film\t2"], "sentence\tlabel",
     "label 2 of example 1 is outside the task's range: sst2 labels are the integers 0..1"),
    (["a good film\tpositive"], "sentence\tlabel", "label 'positive' is not an int"),
], ids=["empty", "wrong-header", "label-out-of-range", "label-not-a-number"])
def test_bad_tsv_is_one_clear_line_and_overwrites_nothing(tiny, finished, tmp_path, capsys, rows, header, message):
    data = write_sst2(tmp_path / "glue", rows, header)
    fails(finetune_args(tiny["model"], data, finished, "--resume"), 2, message, capsys, keep=finished)


def test_no_training_examples_asked_for(tiny, finished, capsys):
    fails(finetune_args(tiny["model"], tiny["data"], finished, "--max-train-samples", "0"), 2,
          "a sample limit must be positive, got 0", capsys, keep=finished)


# --- checkpoints at --resume ---------------------------------------------------------------------------


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst, checkpoint.latest(dst)


def test_truncated_checkpoint_is_named(tiny, finished, tmp_path, capsys):
    out, last = copy_run(finished, tmp_path / "run")
    tensors = last / checkpoint.TENSORS
    tensors.write_bytes(tensors.read_bytes()[:100])
    fails(finetune_args(tiny["model"], tiny["data"], out, "--resume"), 2,
          f"{str(tensors)!r} does not match its checksum", capsys, keep=out)


def test_corrupt_manifest_is_named(tiny, finished, tmp_path, capsys):
    out, last = copy_run(finished, tmp_path / "run")
    (last / checkpoint.MANIFEST).write_text("{not json")
    fails(finetune_args(tiny["model"], tiny["data"], out, "--resume"), 2, "is not valid JSON", capsys, keep=out)


def test_checkpoint_of_another_method_is_refused(tiny, finished, capsys):
    fails(finetune_args(tiny["model"], tiny["data"], finished, "--resume", method="pg_pos"), 2,
          "was written by a different run (method: checkpoint 'lora', this run 'pg_pos'", capsys, keep=finished)


def test_checkpoint_of_another_world_size_is_refused(tiny, finished, tmp_path, capsys):
    out, last = copy_run(finished, tmp_path / "run")
    manifest = json.loads((last / checkpoint.MANIFEST).read_text())
    manifest["world_size"] = 2
    (last / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    fails(finetune_args(tiny["model"], tiny["data"], out, "--resume"), 2,
          "was written by 2 process(es); resume with the same number (this run has 1)", capsys, keep=out)


def test_nan_mid_run_stops_with_the_layer_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    """A NaN that appears after step 3 stops the run at step 4 (exit 3) naming the adapted module; the
    checkpoint of step 2 stays and no checkpoint of the bad state is written."""
    out = tmp_path / "run"
    due = checkpoint.Checkpointer.due

    def poison_after_step_3(self, done):
        if done == 3:
            with torch.no_grad():
                patching.state_of(self.model).groups[1].A[0, 0] = float("nan")  # slot 1: block 0's value
        return due(self, done)

    monkeypatch.setattr(checkpoint.Checkpointer, "due", poison_after_step_3)
    err = fails(finetune_args(tiny["model"], tiny["data"], out), 3, "training stopped: non-finite values", capsys)
    assert "the loss first at step 4" in err
    assert "first bad adapted module: bert.encoder.layer.0.attention.self.value" in err
    assert [p.name for p in checkpoint.complete(out / checkpoint.FOLDER)] == ["step-00000002"]
    assert not (out / "peftkern_model.safetensors").exists() and not (out / "metrics.json").exists()


# --- device and dtype -------------------------------------------------------------------------------


def test_forward_with_part_of_the_model_cast_names_the_module():
    model = tiny_model("llama", "cls")
    peftkern.patch(model, "lora", rank=2, backend="torch")
    model.model.layers[1].self_attn.q_proj.base_layer.to(torch.float64)
    with pytest.raises(TypeError, match=r"model\.layers\.1\.self_attn\.q_proj: input and base weight have different "
                                        r"dtypes \(input cpu/float32, base weight cpu/float64"):
        model(input_ids=tokens())


def test_forward_with_part_of_the_model_moved_names_the_module():
    model = tiny_model("llama", "cls")
    peftkern.patch(model, "lora", rank=2, backend="torch")
    model.model.layers[2].self_attn.v_proj.base_layer.to("meta")
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.v_proj: tensors on different devices "
                                         r"\(input cpu/float32, base weight meta/float32"):
        model(input_ids=tokens())


def test_forward_with_the_adapter_moved_alone_names_the_module():
    model = tiny_model("llama", "cls")
    peftkern.patch(model, "pg_pos", rank=2, backend="torch")
    model.peftkern.to("meta")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: tensors on different devices .*"
                                         r"factor A meta/float32.*call model\.to\(device, dtype\) on the whole"):
        model(input_ids=tokens())


def test_an_input_of_the_wrong_width_or_dtype_names_the_module_and_the_fix():
    layer = torch.nn.Sequential(torch.nn.Linear(16, 8))
    peftkern.patch(layer, "lora", rank=2, targets=["0"], backend="torch")
    with pytest.raises(ValueError, match=r"^0: the input has 17 features \(shape \(2, 17\)\), this module takes 16$"):
        layer(torch.randn(2, 17))
    with pytest.raises(TypeError, match=r"^0: input and base weight have different dtypes .*cast the input to "
                                        r"torch\.float32 or run under torch\.autocast"):
        layer(torch.randn(2, 16, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"the input must be floating point \(cast it to torch\.float32\)"):
        layer(torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^0: the input is a 0-d tensor; it must be at least 1-D, \[\.\.\., 16\]$"):
        layer(torch.tensor(1.0))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=r"cast the input to torch\.float32; or"):
        layer(torch.randn(2, 16, dtype=torch.float64))  # autocast leaves float64 alone: no use suggesting it


@pytest.mark.parametrize("method,options", [("lora", {}), ("lora", {"use_dora": True}), ("pg_pos", {}),
                                            ("tied_lora", {"joint": True})])
def test_a_float64_model_under_autocast_stays_float64(method, options):
    """Autocast leaves float64 tensors alone, so nn.Linear and PEFT's layers compute a float64 model in
    float64 under it; the adapted layers cast to bf16 instead, and attention raised on bf16 queries beside
    float64 keys (a review's finding). They stay float64 now, equal to the run without autocast."""
    model = peftkern.patch(tiny_model("llama").double(), method, rank=2, **options)
    want = model(input_ids=tokens()).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(input_ids=tokens()).logits
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_adapter_cast_alone_still_runs_in_the_input_dtype():
    """The factors follow the input's dtype (a documented cast, not an error): only base-vs-input must agree."""
    model = tiny_model("llama", "cls")
    peftkern.patch(model, "lora", rank=2, backend="torch")
    expected = model(input_ids=tokens()).logits
    model.peftkern.to(torch.float64)
    torch.testing.assert_close(model(input_ids=tokens()).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture
def saved_adapter(tmp_path):
    model = tiny_model("llama", "cls")
    peftkern.patch(model, "lora", rank=2)
    peftkern.save(model, tmp_path)
    return tmp_path


def test_load_into_a_partly_cast_model_is_refused_untouched(saved_adapter):
    model = tiny_model("llama", "cls")
    model.model.layers[1].self_attn.v_proj.to(torch.float64)
    with pytest.raises(TypeError, match=r"model\.layers\.1\.self_attn\.v_proj is torch\.float64 but the model's first "
                                        r"parameter is torch\.float32"):
        peftkern.load(model, saved_adapter)
    assert not patching.is_patched(model)


def test_load_into_an_unmaterialised_model_is_refused(saved_adapter):
    with torch.device("meta"):
        model = tiny_model("llama", "cls")
    model.model.embed_tokens.to_empty(device="cpu")  # the first parameter is real, the targets are not
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj has its weights on the meta device"):
        peftkern.load(model, saved_adapter)
    assert not patching.is_patched(model)
