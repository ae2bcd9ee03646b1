"""Tiny bitsandbytes 4-bit models (the QLoRA setting) and their dequantized full-precision twins."""
import copy

import pytest
import torch
import transformers as T

bnb = pytest.importorskip("bitsandbytes")


def load_4bit(directory, quant_type: str = "nf4", double_quant: bool = True, compute=torch.float32,
              skip=None) -> torch.nn.Module:
    """A saved model loaded the transformers way, its Linears as bitsandbytes 4-bit layers."""
    config = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=double_quant,
                                  llm_int8_skip_modules=skip)
    return T.AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu").eval()


def tiny_llama_64(seed: int = 0) -> torch.nn.Module:
    """A tiny Llama whose layers are 64 and 128 wide: bitsandbytes 0.50's CPU kernels assume a layer's
    input width is a multiple of the 4-bit block (64), and compute narrower layers with one block's
    scale for several (or fail, when repacking); real models' widths are multiples of it."""
    torch.manual_seed(seed)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=97)
    return T.AutoModelForCausalLM.from_config(config).eval()


def tiny_4bit(tmp_path, **kw):
    """(4-bit model, full-precision model holding the 4-bit model's weights dequantized, the saved dir)."""
    directory = tmp_path / "llama-base"
    base = tiny_llama_64()
    base.save_pretrained(directory)
    m4 = load_4bit(directory, **kw)
    return m4, dequantized_twin(m4, base), directory


def dequantized_twin(m4: torch.nn.Module, base: torch.nn.Module) -> torch.nn.Module:
    """``base`` (fp32) with every weight that is 4-bit in ``m4`` replaced by its dequantized value, so the
    two models compute the same function up to the 4-bit kernel's rounding."""
    from peftkern import quant

    twin = copy.deepcopy(base).float()
    with torch.no_grad():
        for name, module in m4.named_modules():
            if quant.kind(module):
                twin.get_submodule(name).weight.copy_(quant.dequantized(module))
    return twin.eval()


def quantized_layers(model: torch.nn.Module):
    from peftkern import quant

    return [name for name, module in model.named_modules() if quant.kind(module)]


def assert_matches_twin(q: torch.nn.Module, r: torch.nn.Module, ids: torch.Tensor, tol: dict,
                        grad_tol: dict = None) -> int:
    """The patched 4-bit model ``q`` and its patched twin ``r`` (same adapter values) give close logits
    and, after a backward of the LM loss, close gradients for every adapter parameter (None where the
    other's is None). Returns how many gradients were compared."""
    out_q, out_r = q(input_ids=ids, labels=ids), r(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_q.logits, out_r.logits, **tol)
    out_q.loss.backward()
    out_r.loss.backward()
    compared = 0
    for (name, a), (_, b) in zip(q.peftkern.named_parameters(), r.peftkern.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, **(grad_tol or tol), msg=name)
            compared += 1
    return compared
