"""Host time of one adapted module's forward + backward, per backend, against PEFT and nn.Linear.

A 64-wide Llama q_proj with 1 x 8 tokens, so arithmetic is negligible and what is measured is
Python, autograd and dispatch per call (the per-module part of bench_launches.py's host_ms).
The DoRA rows reuse the cached norm and g, as every forward of a training step but one does
(no optimizer step runs here).
Median of 9 blocks of 2,000 calls, one thread. Not a GPU figure.

    python benchmarks/bench_module_host.py > benchmarks/results/module_host.md
"""
from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time
import warnings

import torch
from torch import nn


def _median_us(fn, calls: int = 2000, blocks: int = 9) -> float:
    for _ in range(200):
        fn()
    times = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def modules():
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftkern

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    out = {}
    for backend in ("torch", "cpp"):
        for method, dora in (("lora", False), ("vera", False), ("lora", True)):
            model = peftkern.patch(LlamaForCausalLM(config), method=method, targets=["q_proj"], rank=16,
                                   backend=backend, use_dora=dora)
            out[f"peftkern {method}{' + DoRA' if dora else ''}, {backend}"] = model.model.layers[0].self_attn.q_proj
    for kind, cfg, dora in (("lora", peft.LoraConfig, False), ("vera", peft.VeraConfig, False),
                            ("lora", peft.LoraConfig, True)):
        extra = {"use_dora": True} if dora else {}
        model = peft.get_peft_model(LlamaForCausalLM(config), cfg(r=16, target_modules=["q_proj"], **extra))
        out[f"PEFT {kind}{' + DoRA' if dora else ''}"] = model.base_model.model.model.layers[0].self_attn.q_proj
    linear = nn.Linear(64, 64, bias=False).requires_grad_(False)
    out["frozen nn.Linear"] = linear
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 8, 64, requires_grad=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print("# Host time of one adapted module (no GPU involved)\n")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n- commit: {commit or 'unknown'}\n"
          f"- machine: {platform.machine()}, {torch.get_num_threads()} torch thread\n- torch: {torch.__version__}\n")
    print("| module | µs per forward + backward |\n|---|---:|")
    for name, module in modules().items():
        def call(module=module):
            y = module(x)
            y.backward(torch.ones_like(y))
        print(f"| {name} | {_median_us(call):.1f} |")


if __name__ == "__main__":
    main()
