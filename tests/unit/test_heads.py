"""Modules trained in full next to the adapter (modules_to_save): both halves of a tied pair reach every
loader, and the base model stays reachable (disable_adapter, unpatch).

Two faults public bug reports point at (huggingface/peft#1457, #2898; #493, fixed in PEFT by #736):
an LM head tied to the input embeddings was exported by half (PEFT and transformers reloaded the
other half untrained: logits off by 3.5), and ``disable_adapter`` ran the trained head (off by 0.035).
"""
import copy

import pytest
import torch
import transformers as T
from peft import PeftModel

import peftkern
from tests.helpers.models import tiny_model, tokens


def _tied_llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    return T.LlamaForCausalLM(cfg).eval()


def _train_embeddings(model):
    with torch.no_grad():  # what training does
        model.model.embed_tokens.weight.add_(0.05 * torch.randn_like(model.model.embed_tokens.weight))
        for p in model.peftkern.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("resize", [False, True], ids=["plain", "resized"])
@pytest.mark.parametrize("save", [["embed_tokens"], ["lm_head"]], ids=["embed_tokens", "lm_head"])
def test_a_trained_tied_embedding_reloads_whole_in_every_loader(save, resize, tmp_path):
    base = _tied_llama()
    if resize:  # the added-tokens case
        base.resize_token_embeddings(136)
    model = peftkern.patch(copy.deepcopy(base), "lora", modules_to_save=save)
    _train_embeddings(model)
    ids = tokens(seed=3) % 128
    want = _logits(model, ids)
    model.save_pretrained(tmp_path)
    config = (tmp_path / "adapter_config.json").read_text()
    assert '"model.embed_tokens"' in config and '"lm_head"' in config  # both halves of the tied pair

    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(_logits(peft, ids), want, rtol=1e-5, atol=1e-5)
    hf = copy.deepcopy(base)
    hf.load_adapter(str(tmp_path))
    torch.testing.assert_close(_logits(hf.eval(), ids), want, rtol=1e-5, atol=1e-5)
    ours = peftkern.load(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(_logits(ours, ids), want, rtol=0, atol=0)


def _bert_pair():
    return tiny_model("bert", "cls"), tiny_model("bert", "cls")  # the same seed: the same weights


@pytest.mark.parametrize("train_factors", [False, True])
def test_disable_adapter_runs_the_original_head(train_factors):
    base, model = _bert_pair()
    peftkern.patch(model, "lora")  # modules_to_save defaults to ["classifier"]
    with torch.no_grad():
        model.classifier.weight.add_(0.1)  # what training the head does
        if train_factors:
            for p in model.peftkern.parameters():
                p.add_(0.1 * torch.randn_like(p))
    ids = tokens()
    trained = _logits(model, ids)
    with peftkern.disable_adapter(model):
        torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=0, atol=0)
        with peftkern.disable_adapter(model):  # nested: still the base
            torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, ids), trained, rtol=0, atol=0)  # the trained head is back
    assert model.classifier.weight.requires_grad  # the very module, still trained


def test_the_originals_cost_one_copy_and_nothing_else():
    """A frozen copy of each saved module, as buffers: not trained, not saved, and counted among all
    parameters as PEFT's print_trainable_parameters counts its original_module (a review's finding:
    ours left it out)."""
    model = peftkern.patch(tiny_model("bert", "cls"), "lora")
    head = model.classifier.weight.numel() + model.classifier.bias.numel()
    copies = sum(b.numel() for b in model.peftkern.heads.buffers())
    assert copies == head
    assert "peftkern.heads" not in " ".join(model.state_dict())
    assert not any(p.requires_grad for p in model.peftkern.heads.parameters())
    assert peftkern.count(model).total == sum(p.numel() for p in model.parameters()) + head


@pytest.mark.parametrize("use_dora", [False, True])
def test_count_is_peft_print_trainable_parameters_with_a_head(use_dora):
    peft = pytest.importorskip("peft")
    base = tiny_model("bert", "cls")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                                      use_dora=use_dora))
    ours = peftkern.patch(copy.deepcopy(base), "lora", rank=4, targets=["query", "value"], use_dora=use_dora)
    c = peftkern.count(ours)
    assert (c.trainable, c.total) == theirs.get_nb_trainable_parameters()


def test_unpatch_gives_the_base_model_back_and_merge_keeps_the_trained_head():
    base, model = _bert_pair()
    peftkern.patch(model, "lora")
    with torch.no_grad():
        model.classifier.weight.add_(0.1)
    ids = tokens()
    merged = copy.deepcopy(model)
    peftkern.unpatch(model)
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=0, atol=0)
    trained = _logits(merged, ids)
    peftkern.unpatch(merged, merge=True)
    torch.testing.assert_close(_logits(merged, ids), trained, rtol=1e-5, atol=1e-6)


def test_disabling_a_tied_head_pair_runs_both_originals():
    base = _tied_llama()
    model = peftkern.patch(copy.deepcopy(base), "lora", modules_to_save=["embed_tokens"])
    _train_embeddings(model)
    ids = tokens(seed=3) % 128
    with peftkern.disable_adapter(model):
        torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=0, atol=0)


def test_a_head_of_several_modules_is_swapped_and_restored_whole():
    """RoBERTa's classification head is a module of two Linears: one unit, swapped and restored as one."""
    torch.manual_seed(0)
    cfg = T.RobertaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_labels=3, pad_token_id=1)
    base = T.RobertaForSequenceClassification(cfg).eval()
    model = peftkern.patch(copy.deepcopy(base), "lora")
    assert model.peftkern.plan.modules_to_save == ["classifier"]
    trained_dense = model.classifier.dense
    with torch.no_grad():
        model.classifier.dense.weight.add_(0.1)
        model.classifier.out_proj.bias.add_(0.1)
    ids = tokens() % 90 + 3
    trained = _logits(model, ids)
    with peftkern.disable_adapter(model):
        torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=0, atol=0)
    assert model.classifier.dense is trained_dense
    torch.testing.assert_close(_logits(model, ids), trained, rtol=0, atol=0)


def test_originals_lost_to_to_empty_are_refused_not_run():
    """A model patched on meta and materialised with to_empty: the frozen originals of modules_to_save
    (not saved with the model) hold uninitialised memory. disable_adapter and unpatch without merge
    raise, naming the ways out, before anything changes (they ran garbage: logits off by 2e16); a
    merge keeps the trained head and works; a model patched on a real device is unaffected by moves."""
    with torch.device("meta"):
        model = tiny_model("llama", head="cls")
    peftkern.patch(model, "lora", backend="torch")  # a classification head: modules_to_save by default
    assert model.peftkern.plan.modules_to_save
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    ids = tokens()
    model(input_ids=ids)  # the adapted model runs
    with pytest.raises(ValueError, match="original values of modules_to_save .* were lost"):
        with peftkern.disable_adapter(model):
            model(input_ids=ids)
    with pytest.raises(ValueError, match="unpatch\\(model, merge=True\\)"):
        peftkern.unpatch(model)
    assert hasattr(model, "peftkern")  # still patched: nothing changed
    peftkern.unpatch(model, merge=True)
    real = peftkern.patch(tiny_model("llama", head="cls"), "lora", backend="torch").to("cpu").to(torch.float64)
    with peftkern.disable_adapter(real):
        real(input_ids=ids)


def test_a_resize_after_patching_is_named_where_the_originals_are_needed():
    """resize_token_embeddings after patching with the embeddings trained in full left originals of the
    old vocabulary: disable_adapter returned narrower logits (or an IndexError for a new token) and
    unpatch failed in a shape mismatch with the model still patched (a review's finding)."""
    model = peftkern.patch(tiny_model("llama"), "lora", modules_to_save=["embed_tokens", "lm_head"])
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + 8)
    ids = tokens()
    with pytest.raises(ValueError, match=r"no longer fits.*resize_token_embeddings.*Resize before patching"):
        with peftkern.disable_adapter(model):
            pass
    with pytest.raises(ValueError, match=r"unpatch without merge needs the original of"):
        peftkern.unpatch(model)
    assert model(input_ids=ids).logits.shape[-1] == vocab + 8  # still patched, and whole
    peftkern.unpatch(model, merge=True)


@pytest.mark.parametrize("export", ["save_pretrained", "export_peft"])
def test_a_trainable_base_weight_of_an_adapted_module_is_refused_at_save(export, tmp_path):
    """An adapted module whose base weight was made trainable after patch (``model.requires_grad_(True)``)
    was written as a module to save under its adapted path: peftkern.load said the model lacked the
    weight and PEFT raised a bare KeyError (a review's finding). Refused, naming the module and the fixes,
    before a file is written; a trained norm outside the adapter still saves (the head path)."""
    model = peftkern.patch(tiny_model("llama"), "lora")
    model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    out = tmp_path / "adapter"
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: adapted, and its base weight is "
                                         r"trainable.*requires_grad_\(False\).*modules_to_save"):
        model.save_pretrained(out) if export == "save_pretrained" else peftkern.export_peft(model, out)
    assert not out.exists() or not any(out.iterdir())
    model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(False)
    model.model.layers[0].input_layernorm.weight.requires_grad_(True)
    model.save_pretrained(out)
    assert '"model.layers.0.input_layernorm"' in (out / "adapter_config.json").read_text()


def test_adapting_one_half_of_a_tied_pair_while_training_the_other_in_full_is_refused_at_patch():
    """lm_head adapted while modules_to_save trains the embeddings it is tied to: the one matrix would be
    both (PEFT could not load the file this wrote: KeyError). Refused before the model is touched."""
    model = _tied_llama()
    with pytest.raises(ValueError, match=r"lm_head: adapted \(targets\), and its weight is tied to model\.embed_tokens"):
        peftkern.patch(model, "lora", targets=["q_proj", "lm_head"], modules_to_save=["embed_tokens"])
    assert not hasattr(model, "peftkern")
    peftkern.patch(model, "lora", targets=["q_proj", "lm_head"])  # adapting it alone is fine


@pytest.mark.parametrize("save", ["embed_tokens", "lm_head"])
def test_a_peft_file_training_one_half_of_a_tied_pair_is_refused_until_untied(save, tmp_path):
    """PEFT's modules_to_save (ensure_weight_tying=False, its default) trains a copy of one half of a tied
    pair and leaves the other as it was; load_peft copied it into the shared weight, changing both halves:
    logits 0.2 from PEFT's, silently (a review's finding). Refused before the model is touched, naming the
    untying that loads it as PEFT does; untied, it loads equal to PEFT's model."""
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(_tied_llama(), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"],
                                                      modules_to_save=[save], init_lora_weights=False))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad and "modules_to_save" in n:
                p.add_(0.05 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    ids = tokens(seed=3) % 128
    want = _logits(theirs.eval(), ids)
    model = _tied_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"shares its weight in this model \(tied embeddings\).*ensure_weight_tying"):
        peftkern.load_peft(model, tmp_path)
    assert not hasattr(model, "peftkern") and model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # the untying it names
    model.config.tie_word_embeddings = False
    torch.testing.assert_close(_logits(peftkern.load_peft(model, tmp_path).eval(), ids), want, rtol=1e-5, atol=1e-5)
