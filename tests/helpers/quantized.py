"""Tiny bitsandbytes 4-bit models (the QLoRA setting) and their dequantized full-precision twins."""
import copy

import pytest
import torch
import transformers as T

from .models import tiny_model

bnb = pytest.importorskip("bitsandbytes")


def load_4bit(directory, quant_type: str = "nf4", double_quant: bool = True, compute=torch.float32,
              skip=None) -> torch.nn.Module:
    """A saved model loaded the transformers way, its Linears as bitsandbytes 4-bit layers."""
    config = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=double_quant,
                                  llm_int8_skip_modules=skip)
    return T.AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu").eval()


def tiny_4bit(tmp_path, family: str = "llama", **kw):
    """(4-bit model, full-precision model holding the 4-bit model's weights dequantized, the saved dir)."""

    directory = tmp_path / f"{family}-base"
    base = tiny_model(family)
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
