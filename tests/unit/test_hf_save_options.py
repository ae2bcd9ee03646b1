"""``save_pretrained`` of a patched transformers model takes PEFT's and transformers' arguments the way
they do, or refuses them before a file is written; a second adapter through transformers is refused.

A review found every keyword accepted and ignored (``push_to_hub=True`` uploaded nothing, silently), and
``model.load_adapter(dir)`` on a patched model stacking PEFT's layers on peftkern's, which the next save
then dropped without a word."""
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import peftkern
from tests.helpers.adapters import perturb
from tests.helpers.models import tiny_model, tokens


def _patched(**kw):
    return peftkern.patch(tiny_model("llama"), "lora", **kw)


@pytest.mark.parametrize("kwargs,error", [
    ({"push_to_hub": True}, r"push_to_hub=True.*upload_folder"),
    ({"safe_serialization": False}, r"safe_serialization=False.*safetensors only"),
    ({"distributed_checkpoint": True}, r"distributed_checkpoint=True"),
    ({"variant": "fp16"}, r"variant"),
    ({"selected_adapters": ["other"]}, r"selected_adapters=\['other'\].*'default'"),
    ({"save_embedding_layers": "yes"}, r"save_embedding_layers='yes'.*'auto', True or False"),
])
def test_options_it_cannot_honour_are_refused_before_a_file_is_written(kwargs, error, tmp_path):
    with pytest.raises(ValueError, match=error):
        _patched().save_pretrained(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_an_unknown_keyword_is_a_type_error_naming_the_accepted_ones(tmp_path):
    with pytest.raises(TypeError, match=r"\['save_embeding_layers'\].*save_embedding_layers"):
        _patched().save_pretrained(tmp_path, save_embeding_layers=False)


def test_the_options_that_change_nothing_for_an_adapter_are_accepted(tmp_path):
    _patched().save_pretrained(tmp_path, max_shard_size="1GB", safe_serialization=True, selected_adapters=["default"],
                               push_to_hub=False, save_peft_format=True, token=None)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "peftkern_model.safetensors").is_file()


@pytest.mark.parametrize("embedding_layers", ["auto", True, False])
def test_save_embedding_layers_decides_whether_an_adapted_heads_own_weight_is_written(embedding_layers, tmp_path):
    """PEFT's "auto" writes an adapted LM head's base weight (vocab × hidden values); False leaves it out,
    and the file still loads onto the same base with the same logits."""
    base = tiny_model("llama")
    model = peftkern.patch(tiny_model("llama"), "lora", targets=["q_proj", "lm_head"])
    perturb(model)  # B ≠ 0
    model.save_pretrained(tmp_path, save_embedding_layers=embedding_layers)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert ("base_model.model.lm_head.base_layer.weight" in keys) == (embedding_layers is not False)
    ids = tokens()
    theirs = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("method", ["load_adapter", "add_adapter"])
def test_transformers_adapter_methods_are_refused_on_a_patched_model_and_back_after_unpatch(method, tmp_path):
    model = _patched()
    with pytest.raises(ValueError, match=rf"model\.{method}\(\) on a peftkern-patched model: one adapter per model.*"
                                         r"peftkern\.load_peft"):
        getattr(model, method)(str(tmp_path))
    peftkern.unpatch(model)
    assert method not in model.__dict__  # transformers' own method again


def test_save_refuses_a_model_carrying_peft_layers_beside_peftkerns(tmp_path):
    """PEFT's layers injected over a patched model (PeftModel over it) cannot go into one adapter file."""
    source = _patched(targets=["k_proj"])
    source.save_pretrained(tmp_path / "peft")
    model = _patched()
    PeftModel.from_pretrained(model, tmp_path / "peft")  # wraps: model now holds PEFT's k_proj layers
    with pytest.raises(ValueError, match=r"carries PEFT adapter layers \(model\.layers\.0\.self_attn\.k_proj.*one "
                                         r"adapter per model"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
