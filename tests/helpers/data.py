"""Tiny local models and GLUE-layout data for the command-line and training tests."""
import torch
import transformers as T

from peftkern.app import train

POSITIVE = ["good", "great", "fine", "lovely", "superb", "brilliant", "moving", "funny"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "poor", "tedious", "silly"]


def write_sst2_like(root, n_train=48, n_dev=24, seed=0):
    """A tiny SST-2-layout task whose label is the sentiment word in the sentence."""
    g = torch.Generator().manual_seed(seed)
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            words = POSITIVE if label else NEGATIVE
            word = words[int(torch.randint(len(words), (1,), generator=g))]
            rows.append(f"the film was {word} and \"quoted {i} \t{label}")
        (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def save_tiny_bert(path):
    """A tiny random BERT saved with the MiniLM tokenizer, so the CLI loads it like any local model."""
    tokenizer = T.AutoTokenizer.from_pretrained(train.default_model(), local_files_only=True)
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64)
    T.BertModel(cfg).save_pretrained(path)  # no classifier: the CLI's head is fresh, as with a real checkpoint
    tokenizer.save_pretrained(path)
    return path


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def save_tiny_llama(path, chat_template=CHAT_TEMPLATE):
    """A tiny random Llama with the MiniLM tokenizer (and a chat template), saved like any local causal LM."""
    tokenizer = T.AutoTokenizer.from_pretrained(train.default_model(), local_files_only=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.eos_token, tokenizer.bos_token = tokenizer.sep_token, tokenizer.cls_token  # a causal LM's ends
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                        eos_token_id=tokenizer.sep_token_id)
    T.LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_arithmetic_jsonl(path, n=40, form="prompt", seed=0):
    """Short-answer instruction data ({"prompt", "completion"} or {"messages"}) with GSM8K-style answers."""
    import json

    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        a, b = (int(x) for x in torch.randint(1, 20, (2,), generator=g))
        q, ans = f"what is {a} plus {b}?", f"{a} plus {b} is {a + b}\n#### {a + b}"
        row = ({"prompt": q, "completion": ans} if form == "prompt" else
               {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]})
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
