"""Trainable-parameter counts equal the papers' formulas, on meta-device models (no weights)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaModel

import peftkern


def meta_model(cfg):
    with torch.device("meta"):
        return LlamaModel(cfg)


LLAMA2_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32000)
TINYLLAMA = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000)

L, d, r = 32, 4096, 8
QKV = ["q_proj", "k_proj", "v_proj"]

# Tied-LoRA Table 1, joint QKV form, on LLaMA-2-7B at r = 8.
TABLE1 = [
    ("lora", dict(joint=True), 4 * L * d * r),  # vBuA (LoRA): 4Ldr = 4,194,304
    ("tied_lora", dict(tie="AB", train="AB", joint=True), 4 * d * r),  # 131,072
    ("tied_lora", dict(tie="AB", train="ABuv", joint=True), 4 * d * r + L * (r + 3 * d)),
    ("tied_lora", dict(tie="AB", train="Bu", joint=True), (L + 3 * d) * r),
    ("tied_lora", dict(tie="AB", train="B", joint=True), 3 * d * r),
    ("tied_lora", dict(tie="AB", train="Auv", joint=True), d * r + L * (r + 3 * d)),
    ("tied_lora", dict(tie="AB", train="A", joint=True), d * r),
    ("vera_joint", dict(tie="AB", train="uv", joint=True), L * (r + 3 * d)),  # row 8, VeRA, joint
]


@pytest.mark.parametrize("method,options,expected", TABLE1)
def test_tied_lora_table1_counts_llama2_7b(method, options, expected):
    model = meta_model(LLAMA2_7B)
    name = "tied_lora" if method == "vera_joint" else method
    peftkern.patch(model, name, rank=8, targets=QKV, **options)
    assert peftkern.count(model).adapter_trainable == expected


def test_table1_examples_from_the_issue():
    assert TABLE1[0][2] == 4_194_304 and TABLE1[1][2] == 131_072


def test_tied_lora_untied_row1_equals_lora_count():
    a = peftkern.patch(meta_model(LLAMA2_7B), "tied_lora", rank=8, targets=QKV, tie="", train="AB", joint=True)
    assert peftkern.count(a).adapter_trainable == 4 * L * d * r


def test_vera_preset_counts_non_joint():
    """PEFT-style VeRA on q,v: u (r) and v (out) per module; shared A, B frozen."""
    model = peftkern.patch(meta_model(TINYLLAMA), "vera", rank=8)
    assert peftkern.count(model).adapter_trainable == 22 * ((8 + 2048) + (8 + 256))
    assert peftkern.count(model).adapter_total - peftkern.count(model).adapter_trainable == 8 * 2048 + 2048 * 8


def test_tinyllama_lora_r8_q_v_matches_left_paper():
    model = peftkern.patch(meta_model(TINYLLAMA), "lora", rank=8, targets=["q_proj", "v_proj"])
    assert peftkern.count(model).adapter_trainable == 1_126_400


def test_tinyllama_lora_a_frozen_matches_left_table2():
    """LEFT Table 2, LoRA A_F B_L: 405,504 (r = 8) and 811,008 (r = 16)."""
    for rank, expected in ((8, 405_504), (16, 811_008)):
        model = peftkern.patch(meta_model(TINYLLAMA), "lora", rank=rank, train="B")
        assert peftkern.count(model).adapter_trainable == expected


def test_gqa_tied_factors_slice_to_each_module():
    """Tied A, B are stored at the largest shape; k/v (GQA, 256 wide) read the leading rows."""
    model = peftkern.patch(meta_model(TINYLLAMA), "tied_lora", rank=8, targets=QKV, tie="AB", train="AB")
    state = model.peftkern
    assert tuple(state.A.shape) == (8, 2048) and tuple(state.B.shape) == (2048, 8)
    k_slot = next(s for s in state.plan.slots if s.name == "k_proj")
    f = state.factors(k_slot.index)
    assert tuple(f.B.shape) == (256, 8) and f.B.data_ptr() == state.B.data_ptr()
