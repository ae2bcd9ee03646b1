"""A causal-LM training step through TRL's SFTTrainer: peftkern's adapter against PEFT's, same trainer.

SmolLM2-135M's shape (30 layers, hidden 576, random weights: the step's cost does not depend on
the values), fp32, LoRA r 8 on q_proj and v_proj (PEFT: ``peft_config`` given to the trainer;
peftkern: the model patched before it), completion-only loss on prompt/completion pairs of the
shipped GSM8K sample, batch 4 at up to 256 tokens. Each trainer runs ``--steps`` optimizer steps
and a callback times each (process CPU time of one torch thread: the machine is shared); the
first step of every run is warm-up. Ours and PEFT's alternate, ``--rounds`` times each, in one
process; the table gives the medians and the ratio.

    python benchmarks/bench_sft_step.py [--steps 4] [--rounds 2]     writes results/bench_sft_step.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import peftkern  # noqa: E402
from peftkern.app import sft_data  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).float()


def tokenizer():
    from transformers import AutoTokenizer

    from peftkern.app import models

    return AutoTokenizer.from_pretrained(models.default_causal_lm())


def run(kind: str, base, tok, data, steps: int):
    import copy

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model = copy.deepcopy(base)
    peft_config = None
    if kind == "peftkern":
        peftkern.patch(model, "lora", rank=8, alpha=16, targets=TARGETS)
    else:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.process_time() - self.t0)

    out = tempfile.mkdtemp()
    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                     max_length=256, completion_only_loss=True, bf16=False, use_cpu=True, report_to=[],
                     save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=model, args=args, processing_class=tok, peft_config=peft_config, callbacks=[Clock()],
                         train_dataset=Dataset.from_dict(data))
    trainer.train()
    return times[1:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_sft_step.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base, tok = base_model(), tokenizer()
    examples = sft_data.load_jsonl(HERE.parent / "peftkern" / "data" / "gsm8k" / "train.jsonl")[:4 * args.steps]
    data = sft_data.to_trl(examples, chat=getattr(tok, "chat_template", None) is not None)
    times = {"peftkern": [], "peft": []}
    for _ in range(args.rounds):
        for kind in times:
            times[kind] += run(kind, base, tok, data, args.steps)
            print(kind, [round(t, 2) for t in times[kind]], flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    lines = ["# SFT step through TRL's SFTTrainer: peftkern vs PEFT (CPU)", "",
             f"- date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
             f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), torch {torch.__version__}, one thread, "
             "process CPU time per optimizer step (first step of each run excluded)",
             f"- SmolLM2-135M shape, random weights, fp32; LoRA r 8, α 16, q_proj and v_proj; batch 4, ≤ 256 tokens, "
             f"completion-only loss; {args.rounds} alternating rounds of {args.steps} steps; "
             "`python benchmarks/bench_sft_step.py`", "",
             "| adapter | median s / step | steps timed | ours / PEFT |", "|---|---:|---:|---:|",
             f"| peftkern | {med['peftkern']:.2f} | {len(times['peftkern'])} | {med['peftkern'] / med['peft']:.3f} |",
             f"| PEFT | {med['peft']:.2f} | {len(times['peft'])} | |"]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
