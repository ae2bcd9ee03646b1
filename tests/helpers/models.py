"""Tiny randomly initialised transformers models of each supported family, built from configs."""
import torch
import transformers as T

VOCAB = 97


def _cfg(family: str):
    common = dict(vocab_size=VOCAB)
    if family == "llama":  # GQA: k/v narrower than q
        return T.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, **common)
    if family == "qwen2":
        return T.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, **common)
    if family == "bert":
        return T.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            **common)
    if family == "mistral":
        return T.MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, **common)
    raise KeyError(family)


FAMILIES = ("llama", "qwen2", "gpt_neox", "gpt2", "bert")


def tiny_model(family: str = "llama", head: str = "lm", seed: int = 0) -> torch.nn.Module:
    """head: "lm" (causal LM; masked LM for BERT), "cls" (sequence classification), "base"."""
    torch.manual_seed(seed)
    cfg = _cfg(family)
    if head == "cls":
        cfg.num_labels = 2
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = 0
        model = T.AutoModelForSequenceClassification.from_config(cfg)
    elif head == "base":
        model = T.AutoModel.from_config(cfg)
    elif family == "bert":
        model = T.BertForMaskedLM(cfg)
    else:
        model = T.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def tokens(batch: int = 2, seq: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)
