"""Hooks on a base layer run as under PEFT, which calls ``base_layer(x)``: forward and pre-forward hooks
registered on a Linear before (or after) patching, and accelerate's offload hooks (device_map with
"disk"). The fused kernels compute W0·x inside the adapter's GEMM, which would skip them silently, so a
hooked base layer is called and the low-rank term (and DoRA's correction) added to its output."""
import copy

import pytest
import torch
import transformers as T

import peftkern
from tests.helpers.adapters import perturb
from tests.helpers.models import tokens

peft = pytest.importorskip("peft")


def llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128)
    return T.LlamaForCausalLM(cfg).eval()


def _hook(seen, scale=1.0):
    def hook(module, args, out):
        seen.append(out.detach().clone())
        return out * scale if scale != 1.0 else None
    return hook


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("scale", [1.0, 2.0])  # 2.0: the hook replaces the base layer's output
def test_a_forward_hook_registered_before_patching_runs_and_equals_peft(use_dora, scale, tmp_path):
    base = llama()
    ids = tokens()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                   use_dora=use_dora))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp_path)
    seen = {"ours": [], "peft": []}
    pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.register_forward_hook(_hook(seen["peft"], scale))
    mine = copy.deepcopy(base)
    mine.model.layers[0].self_attn.q_proj.register_forward_hook(_hook(seen["ours"], scale))  # before patching
    ours = peftkern.load_peft(mine, tmp_path)
    embeds = base.get_input_embeddings()(ids).detach()
    x_ours, x_peft = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    a, b = ours(inputs_embeds=x_ours, labels=ids), pm(inputs_embeds=x_peft, labels=ids)
    assert len(seen["ours"]) == len(seen["peft"]) == 1
    torch.testing.assert_close(seen["ours"][0], seen["peft"][0], rtol=0, atol=0)  # W0·x + b, before the adapter
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(x_ours.grad, x_peft.grad, rtol=1e-4, atol=1e-6)  # through the hooked layer's backward
    path = peftkern.explain(ours).rows[0]["path"]
    assert path.startswith("base layer called (it has hooks")
    assert not peftkern.explain(ours).rows[1]["path"].startswith("base layer called")  # v_proj: no hooks, fused


def test_a_pre_hook_and_a_hook_added_after_patching_run_too():
    model = peftkern.patch(llama(), "lora", rank=4)
    perturb(model)
    ids = tokens()
    want = model(input_ids=ids).logits
    calls = []
    q = model.model.layers[1].self_attn.q_proj
    q.base_layer.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    q.base_layer.register_forward_hook(lambda m, args, out: calls.append("post"))
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
    assert calls == ["pre", "post"]


def _offloaded(tmp_path):
    """(the tiny Llama, it loaded with layer 1 on "disk": accelerate's hooks bring its weights in per forward)."""
    pytest.importorskip("accelerate")
    base = llama()
    base.save_pretrained(tmp_path / "base")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    return base, T.LlamaForCausalLM.from_pretrained(tmp_path / "base", device_map=device_map,
                                                    offload_folder=str(tmp_path / "off")).eval()


def test_accelerate_disk_offload_runs_the_adapter_on_the_loaded_weight(tmp_path):
    """device_map with a layer on "disk": accelerate keeps its weights on meta and loads them in a hook
    around each Linear's forward. LoRA on those layers equals LoRA on the model in memory."""
    base, offloaded = _offloaded(tmp_path)
    assert offloaded.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    ours = peftkern.patch(offloaded, "lora", rank=4)
    twin = peftkern.patch(copy.deepcopy(base), "lora", rank=4)
    perturb(twin)
    ours.peftkern.load_state_dict(twin.peftkern.state_dict())
    ids = tokens()
    torch.testing.assert_close(ours(input_ids=ids).logits, twin(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert peftkern.explain(ours).rows[-1]["path"].startswith("base layer called")


def test_dora_on_an_offloaded_layer_is_refused_at_patch(tmp_path):
    _, offloaded = _offloaded(tmp_path)
    before = [n for n, _ in offloaded.named_modules()]
    with pytest.raises(ValueError, match="use_dora reads W0 outside a layer's forward.*offloaded by accelerate"):
        peftkern.patch(offloaded, "lora", rank=4, use_dora=True)
    assert [n for n, _ in offloaded.named_modules()] == before  # refused before anything changed


@pytest.mark.parametrize("what", ["merge", "unpatch_merge"])
def test_merging_into_an_offloaded_layer_is_refused(tmp_path, what):
    """A merge writes ΔW into the base weight, which for an offloaded layer is a meta tensor: it would be lost
    (the forward then loads the unmerged weight from disk). Refused before anything changes."""
    _, offloaded = _offloaded(tmp_path)
    model = peftkern.patch(offloaded, "lora", rank=4)
    perturb(model)
    ids = tokens()
    want = model(input_ids=ids).logits
    with pytest.raises(ValueError, match=r"meta device.*offloaded.*lost"):
        peftkern.merge(model) if what == "merge" else peftkern.unpatch(model, merge=True)
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)


def test_backward_hooks_and_global_hooks_run_as_under_peft(tmp_path):
    """A full backward hook (and a backward pre-hook) on a base layer, and torch's global forward hook, which
    PEFT's base_layer(x) call runs: they run here too (the layer leaves the fused path while they exist)."""
    model = peftkern.patch(llama(), "lora", rank=4)
    perturb(model)
    ids = tokens()
    calls = []
    q = model.model.layers[1].self_attn.q_proj  # its input needs a gradient (layer 0's adapter), so its hooks run
    handles = [q.base_layer.register_full_backward_pre_hook(lambda m, g: calls.append("bwd_pre")),
               q.base_layer.register_full_backward_hook(lambda m, gi, go: calls.append("bwd"))]
    model(input_ids=ids).logits.sum().backward()
    assert calls == ["bwd_pre", "bwd"]
    for h in handles:
        h.remove()
    assert q.base_fused  # back on the fused path once they are gone
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(m) if m is q.base_layer else None)
    try:
        assert not q.base_fused
        model(input_ids=ids)
    finally:
        handle.remove()
    assert seen == [q.base_layer] and q.base_fused


def test_every_route_apart_is_run_and_named_from_one_table():
    """The layer decides the route (apart_route); its forward runs APART_ROUTES[route] and explain names
    APART_TEXT[route]: one table each, the same keys. A hooked joint-QKV group equals the fused one."""
    from peftkern.layer import APART_ROUTES, APART_TEXT

    assert set(APART_ROUTES) == set(APART_TEXT)
    model = peftkern.patch(llama(), "tied_lora", rank=4, joint=True, targets=["q_proj", "k_proj", "v_proj"])
    perturb(model)
    ids = tokens()
    want = model(input_ids=ids).logits
    handle = model.model.layers[0].self_attn.k_proj.base_layer.register_forward_hook(lambda m, a, o: None)
    row = next(r for r in peftkern.explain(model).rows if r["module"].endswith("layers.0.self_attn.k_proj"))
    assert row["path"].startswith(APART_TEXT["hooked joint"])
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
    handle.remove()
