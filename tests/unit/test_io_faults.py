"""load() refuses bad adapters with a clear error and leaves the model untouched; save() is atomic."""
import copy
import json
import os

import pytest
import torch
import transformers as T

import peftkern
from peftkern import native_format as pk_io
from peftkern import patching
from tests.helpers.adapters import patched
from tests.helpers.models import tiny_model, tokens


def snapshot(model):
    """Everything load could change: module types, tensor values, requires_grad flags."""
    return ([type(m).__name__ for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_untouched(model, before):
    types, tensors, flags = snapshot(model)
    assert not patching.is_patched(model)
    assert types == before[0] and flags == before[2]
    assert tensors.keys() == before[1].keys() and all(torch.equal(tensors[k], before[1][k]) for k in tensors)


@pytest.fixture
def saved(tmp_path):
    base, model = patched("bert", "cls", "lora")
    peftkern.save(model, tmp_path)
    return base, model, tmp_path


def refuses(model, directory, error, match):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        peftkern.load(model, directory)
    assert_untouched(model, before)


def other_bert(**overrides):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_labels=2)
    cfg.update(overrides)
    torch.manual_seed(0)
    return T.BertForSequenceClassification(T.BertConfig(**cfg)).eval()


def test_model_of_another_width(saved):
    refuses(other_bert(hidden_size=48), saved[2], ValueError, r"48->48 in this model but the adapter was saved for 32->32")


def test_model_with_fewer_layers(saved):
    refuses(other_bert(num_hidden_layers=1), saved[2], ValueError, r"saved for a model with 2 blocks; this one has 1")


def test_model_with_more_layers(saved):
    refuses(other_bert(num_hidden_layers=3), saved[2], ValueError, r"saved for a model with 2 blocks; this one has 3")


def test_head_with_another_label_count(saved):
    refuses(other_bert(num_labels=3), saved[2], ValueError, r"classifier.*different number of labels")


def test_another_architecture(saved):
    refuses(tiny_model("llama", "cls"), saved[2], ValueError, r"none of the adapter's \d+ modules exists in this model .*"
            "another architecture")


def _edit_config(directory, **changes):
    path = directory / "peftkern_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_config_from_another_method(saved):
    base, _, d = saved
    _edit_config(d, method="vera", options={})
    refuses(copy.deepcopy(base), d, ValueError, r"adapter file does not fit this model")


def test_config_naming_an_unknown_method(saved):
    base, _, d = saved
    _edit_config(d, method="no_such_method")
    refuses(copy.deepcopy(base), d, ValueError, r"unknown method 'no_such_method'; valid methods: .*lora")


def test_config_with_an_unknown_option(saved):
    base, _, d = saved
    _edit_config(d, options={"train": "AB", "bogus": 1})
    refuses(copy.deepcopy(base), d, TypeError, r"does not take option.*'bogus'")


def test_missing_tensor_file(saved):
    base, _, d = saved
    (d / "peftkern_model.safetensors").unlink()
    refuses(copy.deepcopy(base), d, FileNotFoundError, r"peftkern_model.safetensors.* missing")


def test_missing_config_and_missing_directory(saved, tmp_path):
    base, _, d = saved
    (d / "peftkern_config.json").unlink()  # the PEFT files are still there: the error says how to load those
    refuses(copy.deepcopy(base), d, ValueError, r"PEFT adapter but no peftkern_config.json.*load_peft")
    (d / "adapter_config.json").unlink()
    refuses(copy.deepcopy(base), d, FileNotFoundError, r"peftkern_config.json.* missing")
    refuses(copy.deepcopy(base), tmp_path / "nowhere", FileNotFoundError, r"no adapter directory")


def test_truncated_tensor_file(saved):
    base, _, d = saved
    path = d / "peftkern_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refuses(copy.deepcopy(base), d, ValueError, r"truncated or corrupt")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_tensor_file_without_checksum(saved, damage):
    """Even with no checksum to compare (an edited config), safetensors' own parse error becomes a ValueError."""
    base, _, d = saved
    cfg = json.loads((d / "peftkern_config.json").read_text())
    del cfg["weights_sha256"]
    (d / "peftkern_config.json").write_text(json.dumps(cfg))
    path = d / "peftkern_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7] if damage == "truncate" else b"\x07" * 16 + data[16:])
    refuses(copy.deepcopy(base), d, ValueError, r"not a readable safetensors file")


def test_flipped_byte_is_caught_by_the_checksum(saved):
    base, _, d = saved
    path = d / "peftkern_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a value byte: still parses, but the tensors are wrong
    path.write_bytes(bytes(data))
    refuses(copy.deepcopy(base), d, ValueError, r"does not match the checksum")


def test_corrupt_config(saved):
    base, _, d = saved
    (d / "peftkern_config.json").write_text('{"method": "lora", ')
    refuses(copy.deepcopy(base), d, ValueError, r"not valid JSON")


def test_peft_adapter_is_named(saved, tmp_path):
    base, model, _ = saved
    peftkern.export_peft(model, tmp_path / "peft")
    refuses(copy.deepcopy(base), tmp_path / "peft", ValueError, r"PEFT adapter .*peftkern.load_peft")


def test_already_patched_model(saved):
    base, _, d = saved
    model = peftkern.patch(copy.deepcopy(base), "vera", rank=4)
    with pytest.raises(ValueError, match="already patched"):
        peftkern.load(model, d)
    assert model.peftkern.plan.method == "vera"


def test_save_needs_a_patched_model(tmp_path):
    with pytest.raises(ValueError, match="not patched"):
        peftkern.save(tiny_model("bert", "cls"), tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- atomic writes -----------------------------------------------------------------------------


def _crash_on(monkeypatch, name, after=0):
    real = getattr(os, name)
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(f"simulated crash in os.{name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, crashing)


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_crash_mid_save_keeps_the_previous_adapter(saved, monkeypatch, where):
    base, model, d = saved
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with torch.no_grad():
        model.peftkern.groups[0].B.add_(1.0)
    _crash_on(monkeypatch, where)
    with pytest.raises(OSError, match="simulated crash"):
        peftkern.save(model, d)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # no temporary file left, old files intact
    loaded = peftkern.load(copy.deepcopy(base), d)
    with torch.no_grad():
        model.peftkern.groups[0].B.sub_(1.0)
        torch.testing.assert_close(loaded(input_ids=tokens()).logits, model(input_ids=tokens()).logits, rtol=0,
                                   atol=1e-6)


def test_crash_between_tensors_and_config_is_detected(saved, monkeypatch):
    """Tensors are replaced first; a crash before the config follows is caught by the checksum."""
    base, model, d = saved
    with torch.no_grad():
        model.peftkern.groups[0].B.add_(1.0)
    _crash_on(monkeypatch, "replace", after=1)
    with pytest.raises(OSError):
        peftkern.save(model, d)
    monkeypatch.undo()
    refuses(copy.deepcopy(base), d, ValueError, r"save was interrupted")


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "f.bin"
    pk_io.atomic_write(target, b"old")
    pk_io.atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
