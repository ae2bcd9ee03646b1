"""PG trainable-parameter counts equal LEFT's tables exactly, on TinyLlama-1.1B built on the
meta device (no weights): q_proj 2048->2048 and v_proj 2048->256, 22 layers, h1 = 20.

Two typos in the paper are corrected here, because the paper's own rule gives the
corrected numbers (and its other tables print them):
  * Table 2 prints 1,077,720 for PG-Pos A_H B_L at r = 8, h2 = 20; that is its A_H B_H
    count. Tables 3 and 4 give 1,094,892.
  * Table 2 prints 775,404 for PG-Trainable A_F B_H at r = 16; the rule gives
    775,004 = 774,564 (PG-Fixed) + 22·20 embeddings, and PG-Pos is 775,404 = 775,004 + 20·20.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaModel

import peftkern

TINYLLAMA = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000)
L, H1 = 22, 20

CONFIGS = {  # name -> options
    "A_H B_L": dict(generate="A", other="trained"),
    "A_H B_L h2=1": dict(generate="A", other="trained", hidden_dim=1),
    "A_L B_H": dict(generate="B", other="trained"),
    "A_H B_H": dict(generate="AB", other="trained"),
    "A_F B_H": dict(generate="B", other="frozen"),
}
METHODS = ("pg_fixed", "pg_trainable", "pg_pos")
PAPER = {  # (config, rank) -> counts for (pg_fixed, pg_trainable, pg_pos)
    ("A_H B_L", 8): (1_094_052, 1_094_492, 1_094_892),
    ("A_H B_L h2=1", 8): (471_061, 471_501, 471_521),
    ("A_L B_H", 8): (1_108_388, 1_108_828, 1_109_228),
    ("A_H B_H", 8): (1_076_040, 1_076_920, 1_077_720),
    ("A_F B_H", 8): (387_492, 387_932, 388_332),
    ("A_H B_L", 16): (2_187_684, 2_188_124, 2_188_524),
    ("A_H B_L h2=1", 16): (942_101, 942_541, 942_561),
    ("A_L B_H", 16): (2_216_356, 2_216_796, 2_217_196),
    ("A_H B_H", 16): (2_151_240, 2_152_120, 2_152_920),
    ("A_F B_H", 16): (774_564, 775_004, 775_404),
}


def meta_model():
    with torch.device("meta"):
        return LlamaModel(TINYLLAMA)


def trainable(method, rank, **options):
    return peftkern.count(peftkern.patch(meta_model(), method, rank=rank, **options)).adapter_trainable


@pytest.mark.parametrize("config,rank", list(PAPER))
@pytest.mark.parametrize("method", METHODS)
def test_counts_match_left_tables(method, config, rank):
    assert trainable(method, rank, **CONFIGS[config]) == PAPER[(config, rank)][METHODS.index(method)]


# LEFT Table 3, PG-Pos A_H B_L with layers grouped into G hypernetworks. The paper's numbers
# are G·(hypernet + L·h1) + B_L: every hypernetwork carries a full L×h1 embedding table. Ours
# gives each group only its own layers' embeddings, i.e. (G − 1)·L·h1 fewer.
GROUPED = [(8, 11, 1_784_280), (8, 1, 15_572_040), (16, 11, 3_566_040), (16, 1, 31_116_360)]


@pytest.mark.parametrize("rank,per,paper", GROUPED)
def test_grouped_counts_differ_from_paper_by_the_duplicated_embeddings(rank, per, paper):
    groups = L // per
    ours = trainable("pg_pos", rank, layers_per_hypernet=per)
    assert ours + (groups - 1) * L * H1 == paper


def test_grouped_counts_r8_values():
    assert trainable("pg_pos", 8, layers_per_hypernet=11) == 1_783_840
    assert trainable("pg_pos", 8, layers_per_hypernet=1) == 15_562_800


def test_frozen_parts_are_counted_as_frozen_adapter_tensors():
    """A_F is 22 frozen [8, 2048] + [8, 2048] tensors; pg_fixed's embeddings are frozen too."""
    c = peftkern.count(peftkern.patch(meta_model(), "pg_fixed", rank=8, generate="B", other="frozen"))
    assert c.adapter_total - c.adapter_trainable == L * 8 * (2048 + 2048) + L * H1


def test_default_patch_is_the_paper_setting():
    """No options: rank 8, alpha 16 (LEFT Table 6), q_proj and v_proj, A_H B_L, h1 = h2 = 20."""
    model = peftkern.patch(meta_model(), method="pg_pos")
    plan = model.peftkern.plan
    assert (plan.rank, plan.alpha, plan.target_names) == (8, 16.0, ["q_proj", "v_proj"])
    assert peftkern.count(model).adapter_trainable == PAPER[("A_H B_L", 8)][2]


def test_parameter_table_on_meta_device():
    table = peftkern.parameter_table(TINYLLAMA, "pg_pos", rank=8)
    assert "pg_pos (rank 8, alpha 16)" in table
    assert "hypernets.0.A.linear2.weight" in table and str((8 * 2048 + 8 * 2048, 20)) in table
    assert "hypernets.0.A.embed" in table and f"B.{2 * L - 1}" in table
    assert f"adapter parameters trained: {PAPER[('A_H B_L', 8)][2]:,}" in table
