"""Instruction data for ``peftkern finetune --task sft``: JSONL files, checked line by line.

Each line is a JSON object in one of two forms (the two TRL reads):

    {"prompt": "...", "completion": "..."}                                  prompt / completion
    {"messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}                chat

A chat example becomes a prompt (every message but the last) and a completion (the last
message, which must be the assistant's). Both forms then go through the tokenizer's chat
template when it has one (plain text otherwise), and the loss is taken on the completion only.
A bad file raises ``DataError`` naming the file, the line and what is wrong, or the fields
expected: nothing is trained on a file that does not parse whole.

``final_answer`` reads GSM8K's convention, a last line ``#### N``, for the final-answer accuracy.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

FORMS = ('{"prompt": ..., "completion": ...}', '{"messages": [{"role": ..., "content": ...}, ...]}')
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """The instruction data cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: List[Dict[str, str]]  # chat messages before the answer
    completion: str  # the answer the loss is taken on
    line: int

    @property
    def question(self) -> str:
        return self.prompt[-1]["content"]


def _fail(path: Path, line: int, what: str) -> DataError:
    return DataError(f"{path}:{line}: {what}; each line must be one JSON object, {FORMS[0]} or {FORMS[1]}")


def _text(path: Path, line: int, value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, line, f"{field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _fail(path, line, f"{field!r} is empty")
    return value


def _example(path: Path, line: int, row: Any) -> Example:
    if not isinstance(row, dict):
        raise _fail(path, line, f"a JSON {type(row).__name__} is not an object")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise _fail(path, line, "'messages' must be a list of at least two messages (a question and its answer)")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise _fail(path, line, f"message {i} must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise _fail(path, line, f"message {i} has role {m['role']!r}; roles: {', '.join(ROLES)}")
            out.append({"role": m["role"], "content": _text(path, line, m["content"], f"messages[{i}].content")})
        if out[-1]["role"] != "assistant":
            raise _fail(path, line, f"the last message must be the assistant's answer (the completion), "
                                    f"not {out[-1]['role']!r}")
        return Example(out[:-1], out[-1]["content"], line)
    if "prompt" in row or "completion" in row:
        missing = [k for k in ("prompt", "completion") if k not in row]
        if missing:
            raise _fail(path, line, f"{missing[0]!r} is missing")
        prompt = _text(path, line, row["prompt"], "prompt")
        return Example([{"role": "user", "content": prompt}], _text(path, line, row["completion"], "completion"), line)
    if "question" in row and "answer" in row:  # GSM8K's own field names
        return Example([{"role": "user", "content": _text(path, line, row["question"], "question")}],
                       _text(path, line, row["answer"], "answer"), line)
    raise _fail(path, line, f"fields {sorted(row)[:6]} are neither 'prompt'/'completion' nor 'messages'")


def load_jsonl(path, limit: Optional[int] = None) -> List[Example]:
    """Every example of a JSONL file (the first ``limit``), checked (module docstring). Blank lines are
    skipped. Raises FileNotFoundError for a missing file and DataError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    out: List[Example] = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _fail(path, number, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            out.append(_example(path, number, row))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{path} holds no examples; each line must be one JSON object, {FORMS[0]} or {FORMS[1]}")
    return out


def split(examples: Sequence[Example], eval_fraction: float, seed: int):
    """(train, held-out): a fixed random ``eval_fraction`` of the examples is held out (at least one)."""
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(examples)))
    if n_eval >= len(examples):
        raise DataError(f"{len(examples)} example(s) leave nothing to train on after holding out {n_eval} for "
                        "evaluation: give more examples or an --eval-data file")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def to_trl(examples: Sequence[Example], chat: bool) -> Dict[str, list]:
    """Columns of TRL's prompt-completion format: conversational with a chat template, plain text without."""
    if chat:
        return {"prompt": [e.prompt for e in examples],
                "completion": [[{"role": "assistant", "content": e.completion}] for e in examples]}
    return {"prompt": ["\n".join(m["content"] for m in e.prompt) + "\n" for e in examples],
            "completion": [e.completion for e in examples]}


def prompt_length(e: Example, tokenizer, chat: bool) -> int:
    """Tokens before the example's completion as TRL tokenizes it (to_trl's columns): the common prefix
    of the prompt's tokens and the prompt-and-completion's (a tokenizer's end token after a lone prompt is
    not part of it), the chat template applied with the assistant's turn opened."""
    if chat:
        prompt = tokenizer.apply_chat_template(e.prompt, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template([*e.prompt, {"role": "assistant", "content": e.completion}],
                                              tokenize=False)
        ids_p, ids_w = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt, whole))
    else:
        text = to_trl([e], False)
        ids_p = tokenizer(text["prompt"][0])["input_ids"]
        ids_w = tokenizer(text["prompt"][0] + text["completion"][0])["input_ids"]
    n = 0
    while n < min(len(ids_p), len(ids_w)) and ids_p[n] == ids_w[n]:
        n += 1
    return n


def check_room(examples: Sequence[Example], tokenizer, chat: bool, max_length: int, what: str) -> None:
    """Raise DataError when ``max_length`` leaves no completion token in any of ``examples``: TRL then
    trains on nothing (or, packed, reports a loss of 0 and a perplexity of 1). Stops at the first example
    with room: TRL tokenizes them all again anyway."""
    shortest = None
    for e in examples:
        n = prompt_length(e, tokenizer, chat)
        if n < max_length:
            return
        shortest = n if shortest is None else min(shortest, n)
    if shortest is not None:
        raise DataError(f"--max-length {max_length} leaves no completion token in any {what} example: the shortest "
                        f"prompt has {shortest} tokens; raise --max-length")


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> Optional[str]:
    """GSM8K's final answer: the first line after the last ``####``, as a number without thousands
    separators when it holds one (None when the text has no ``####``)."""
    if "####" not in text:
        return None
    lines = text.rsplit("####", 1)[1].strip().splitlines()
    value = lines[0].strip() if lines else ""
    number = _NUMBER.search(value)
    return number.group(0).replace(",", "") if number else value


def _tokens(text: str) -> List[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 (lower-cased word tokens, bag overlap)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum(min(pred.count(t), ref.count(t)) for t in set(pred))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(" ".join(_tokens(prediction)) == " ".join(_tokens(reference)))


__all__ = ["DataError", "Example", "load_jsonl", "split", "to_trl", "final_answer", "token_f1", "exact_match"]
