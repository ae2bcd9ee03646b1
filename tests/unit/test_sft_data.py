"""Instruction data: both JSONL forms, the held-out split, and a clear error (file, line, what is wrong)
for every kind of bad file; GSM8K's final answers and SQuAD's token F1."""
import json

import pytest

from peftkern.app import sft_data


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_both_forms_become_prompt_and_completion(tmp_path):
    f = _write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "2+2?", "completion": "4\n#### 4"}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+3?"},
                                 {"role": "assistant", "content": "#### 6"}]}),
        json.dumps({"question": "1+1?", "answer": "#### 2"})])  # GSM8K's own field names
    a, b, c = sft_data.load_jsonl(f)
    assert a.prompt == [{"role": "user", "content": "2+2?"}] and a.completion == "4\n#### 4" and a.line == 1
    assert [m["role"] for m in b.prompt] == ["system", "user"] and b.completion == "#### 6" and b.line == 3
    assert c.question == "1+1?" and sft_data.final_answer(c.completion) == "2"
    chat = sft_data.to_trl([a, b], chat=True)
    assert chat["completion"][1] == [{"role": "assistant", "content": "#### 6"}]
    plain = sft_data.to_trl([a], chat=False)
    assert plain == {"prompt": ["2+2?\n"], "completion": ["4\n#### 4"]}


@pytest.mark.parametrize("line,words", [
    ("{not json", ":2: not valid JSON"),
    ('["a list"]', "a JSON list is not an object"),
    ('{"prompt": "q"}', "'completion' is missing"),
    ('{"prompt": "q", "completion": 3}', "'completion' must be a string"),
    ('{"prompt": " ", "completion": "a"}', "'prompt' is empty"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "at least two messages"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}',
     "the last message must be the assistant's"),
    ('{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}', "role 'robot'"),
    ('{"text": "x"}', "neither 'prompt'/'completion' nor 'messages'"),
])
def test_a_bad_line_is_named_with_the_expected_forms(tmp_path, line, words):
    f = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok", "completion": "ok"}), line])
    with pytest.raises(sft_data.DataError) as err:
        sft_data.load_jsonl(f)
    message = str(err.value)
    assert words in message and "prompt" in message and "messages" in message
    assert f"{f}:" in message  # the file and its line number


def test_an_empty_or_missing_file(tmp_path):
    with pytest.raises(sft_data.DataError, match="holds no examples"):
        sft_data.load_jsonl(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="no such file"):
        sft_data.load_jsonl(tmp_path / "missing.jsonl")


def test_the_held_out_split_is_fixed_and_disjoint(tmp_path):
    f = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": f"q{i}", "completion": "a"}) for i in range(20)])
    examples = sft_data.load_jsonl(f)
    train, held = sft_data.split(examples, 0.1, seed=0)
    assert len(held) == 2 and len(train) == 18 and {e.line for e in train}.isdisjoint({e.line for e in held})
    assert sft_data.split(examples, 0.1, seed=0) == (train, held)
    with pytest.raises(sft_data.DataError, match="nothing to train on"):
        sft_data.split(examples[:1], 0.1, seed=0)


def test_final_answers_and_token_f1():
    assert sft_data.final_answer("steps <<3*4=12>>\n#### 1,234") == "1234"
    assert sft_data.final_answer("#### 72.\n") == "72" and sft_data.final_answer("no marker") is None
    assert sft_data.final_answer("#### -3.5 apples") == "-3.5"
    assert sft_data.token_f1("the cat sat", "a cat sat") == pytest.approx(2 / 3)
    assert sft_data.exact_match("The Cat.", "the cat") == 1.0 and sft_data.token_f1("", "x") == 0.0
