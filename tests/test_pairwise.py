"""Preference rows (LLaMA-Factory's `ranking: true` datasets) -> pairs -> chosen/rejected samples."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from megatune.data.conversation import Role
from megatune.data.pairwise import (
    EncodedPair,
    convert_pairs,
    encode_pair,
    encode_pair_row,
    pair_samples,
    truncate_pair,
)
from megatune.data.processors import infer_seqlen
from megatune.data.registry import DataError, load_rows, resolve_datasets
from megatune.data.templates import get_template
from megatune.tiny_tokenizer import make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "fixtures"
LF_DATA = SHARED / "lf_data"
CHAT_TEMPLATES = SHARED / "chat_templates"

CHATML = "<|im_start|>{role}\n{content}<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer(family="qwen")


def write_dataset(tmp_path, rows, **entry) -> Path:
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    info = {"pairs": {"file_name": "pairs.json", "ranking": True, **entry}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path


def pairs_of(directory, skip_invalid=False):
    spec, = resolve_datasets("pairs", directory)
    return convert_pairs(load_rows(spec), spec, skip_invalid=skip_invalid)


def chatml(*turns) -> str:
    return "".join(CHATML.format(role=r, content=c) for r, c in turns)


def split_ids(tokenizer, prompt_text, response_text):
    """Independent expectation: prompt and response tokenized on their own (both chatml
    boundaries end a pre-token, so this equals tokenizing the whole text once)."""
    return (tokenizer(prompt_text, add_special_tokens=False)["input_ids"],
            tokenizer(response_text, add_special_tokens=False)["input_ids"])


def test_alpaca_rows_become_pairs_with_a_shared_masked_prompt(tmp_path, tokenizer):
    rows = [{"instruction": "Name a colour.", "input": "One word.", "chosen": "Blue.", "rejected": "Seven.",
             "system": "Be brief.", "history": [["Hi", "Hello!"]]}]
    d = write_dataset(tmp_path, rows, columns={"prompt": "instruction", "query": "input", "chosen": "chosen",
                                               "rejected": "rejected", "system": "system", "history": "history"})
    (pair,), skipped = pairs_of(d)
    assert skipped == 0
    assert [(m.role, m.content) for m in pair.prompt.messages] == [
        (Role.USER, "Hi"), (Role.ASSISTANT, "Hello!"), (Role.USER, "Name a colour.\nOne word.")]
    assert pair.prompt.system == "Be brief."
    assert (pair.chosen.role, pair.chosen.content) == (Role.ASSISTANT, "Blue.")
    assert (pair.rejected.role, pair.rejected.content) == (Role.ASSISTANT, "Seven.")

    chosen, rejected = pair_samples(encode_pair(get_template("qwen"), tokenizer, pair), cutoff_len=1024)
    prompt_text = chatml(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"),
                         ("user", "Name a colour.\nOne word.")) + "<|im_start|>assistant\n"
    for sample, answer in ((chosen, "Blue."), (rejected, "Seven.")):
        prompt_ids, response_ids = split_ids(tokenizer, prompt_text, answer + "<|im_end|>\n")
        assert sample.input_ids == prompt_ids + response_ids
        # the whole prompt, earlier answer included, is masked; the response is learned
        assert sample.labels == [-100] * len(prompt_ids) + response_ids
        assert not sample.truncated


def test_sharegpt_rows_like_dpo_en_demo(tmp_path, tokenizer):
    rows = [{
        "conversations": [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "2+2?"},
                          {"from": "gpt", "value": "4"}, {"from": "human", "value": "And 3+3?"}],
        "chosen": {"from": "gpt", "value": "6"},
        "rejected": {"from": "gpt", "value": "I don't know."},
    }]
    # columns chosen/rejected left to their defaults (LLaMA-Factory requires naming them; we need not)
    d = write_dataset(tmp_path, rows, formatting="sharegpt")
    (pair,), _ = pairs_of(d)
    assert pair.prompt.system == "You are terse."
    assert [m.content for m in pair.prompt.messages] == ["2+2?", "4", "And 3+3?"]
    enc = encode_pair(get_template("qwen"), tokenizer, pair)
    prompt_text = chatml(("system", "You are terse."), ("user", "2+2?"), ("assistant", "4"),
                         ("user", "And 3+3?")) + "<|im_start|>assistant\n"
    prompt_ids, chosen_ids = split_ids(tokenizer, prompt_text, "6<|im_end|>\n")
    _, rejected_ids = split_ids(tokenizer, prompt_text, "I don't know.<|im_end|>\n")
    assert enc == EncodedPair(prompt_ids, chosen_ids, rejected_ids)


def test_openai_rows_with_a_tool_call_answer(tmp_path, tokenizer):
    rows = [{
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "chosen": {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        "rejected": {"role": "assistant", "content": "It is always sunny."},
    }]
    d = write_dataset(tmp_path, rows, formatting="openai")
    (pair,), _ = pairs_of(d)
    assert pair.chosen.role == Role.FUNCTION and pair.rejected.role == Role.ASSISTANT
    chosen, rejected = pair_samples(encode_pair(get_template("qwen"), tokenizer, pair), 1024)
    assert "<tool_call>" in tokenizer.decode([t for t, lab in zip(chosen.input_ids, chosen.labels) if lab != -100])


# LLaMA-Factory's own expectations for infer_seqlen (tests/data/processor/test_processor_utils.py)
LF_CASES = [((3000, 2000, 1000), (600, 400)), ((2000, 3000, 1000), (400, 600)), ((1000, 100, 1000), (900, 100)),
            ((100, 1000, 1000), (100, 900)), ((100, 500, 1000), (100, 500)), ((500, 100, 1000), (500, 100)),
            ((10, 10, 1000), (10, 10))]


@pytest.mark.parametrize("args,expected", LF_CASES)
def test_infer_seqlen_matches_llama_factory(args, expected):
    assert infer_seqlen(*args) == expected


def expected_cut(prompt_len, chosen_len, rejected_len, cutoff):
    """The pairwise rule written out independently: the response budget from the longer answer."""
    t = max(chosen_len, rejected_len)
    if 2 * t < cutoff:  # short responses: kept, the prompt gets the rest
        keep_t = t
    elif 2 * prompt_len < cutoff:  # short prompt: kept, responses get the rest
        keep_t = min(t, cutoff - prompt_len)
    else:  # both long: proportional share (LLaMA-Factory rounds the float product down)
        keep_t = min(t, int(cutoff * (t / (prompt_len + t))))
    keep_p = min(prompt_len, cutoff - keep_t)
    return keep_p, min(chosen_len, keep_t), min(rejected_len, keep_t)


def test_pair_truncation_uses_the_longer_response():
    rng = random.Random(0)
    cases = [(rng.randint(1, 300), rng.randint(1, 300), rng.randint(1, 300), rng.randint(8, 400)) for _ in range(2000)]
    cases += [(10, 90, 5, 64), (80, 30, 70, 64), (100, 100, 1, 64), (5, 5, 5, 64)]
    for p, c, r, cutoff in cases:
        enc = EncodedPair(list(range(p)), list(range(1000, 1000 + c)), list(range(2000, 2000 + r)))
        cut, truncated = truncate_pair(enc, cutoff)
        keep = expected_cut(p, c, r, cutoff)
        assert (len(cut.prompt_ids), len(cut.chosen_ids), len(cut.rejected_ids)) == keep, (p, c, r, cutoff)
        assert cut.prompt_ids == enc.prompt_ids[:keep[0]] and cut.rejected_ids == enc.rejected_ids[:keep[2]]
        assert keep[0] + max(keep[1], keep[2]) <= cutoff
        assert truncated == (keep[0] + max(keep[1], keep[2]) < p + max(c, r))
    # the rejected sample (40 + 10 tokens) would fit alone, but the budget comes from the longer
    # chosen answer: the shared prompt is cut to 32 for both
    cut, _ = truncate_pair(EncodedPair([0] * 40, [1] * 40, [2] * 10), 64)
    assert (len(cut.prompt_ids), len(cut.chosen_ids), len(cut.rejected_ids)) == (32, 32, 10)


def test_truncation_that_leaves_no_response_is_an_error():
    with pytest.raises(DataError, match="row 3: nothing of the responses is left after truncation to cutoff_len=10"):
        pair_samples(EncodedPair([0] * 1000, [1] * 5, [2] * 5), 10, source="dataset 'x', row 3")


BAD_ROWS = {
    "missing rejected column": (
        {"instruction": "Q", "chosen": "A"}, {},
        r"dataset 'pairs', file .*pairs.json, row 0: missing column 'rejected'"),
    "empty chosen": (
        {"instruction": "Q", "chosen": "", "rejected": "B"}, {},
        r"row 0: no chosen answer \(column 'chosen' is empty\)"),
    "null rejected": (
        {"instruction": "Q", "chosen": "A", "rejected": None}, {},
        r"row 0: no rejected answer"),
    "alpaca answer not text": (
        {"instruction": "Q", "chosen": {"from": "gpt", "value": "A"}, "rejected": "B"}, {},
        r"row 0: the chosen answer \(column 'chosen'\) of an alpaca preference row must be text"),
    "sharegpt answer from the user": (
        {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "human", "value": "A"},
         "rejected": {"from": "gpt", "value": "B"}},
        {"formatting": "sharegpt"},
        r"row 0: the chosen answer \(column 'chosen'\) has role 'human'; it must be one of \['gpt', 'function_call'\]"),
    "sharegpt prompt ends with an answer": (
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
         "chosen": {"from": "gpt", "value": "A"}, "rejected": {"from": "gpt", "value": "B"}},
        {"formatting": "sharegpt"},
        r"row 0: the prompt in column 'conversations' must end with a user or observation turn .* ends with a 'gpt' turn"),
    "sharegpt answer as a list": (
        {"conversations": [{"from": "human", "value": "Q"}], "chosen": [{"from": "gpt", "value": "A"}],
         "rejected": {"from": "gpt", "value": "B"}},
        {"formatting": "sharegpt"},
        r"row 0: the chosen answer \(column 'chosen'\) is a list"),
    "sharegpt bad function call": (
        {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "A"},
         "rejected": {"from": "function_call", "value": "not json"}},
        {"formatting": "sharegpt"},
        r"row 0: the rejected answer \(column 'rejected'\) is a function call but not valid JSON"),
}


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_rows_name_dataset_row_and_side(tmp_path, name):
    row, entry, message = BAD_ROWS[name]
    good = dict(row)
    d = write_dataset(tmp_path, [row], **entry)
    with pytest.raises(DataError, match=message):
        pairs_of(d)
    # skip_invalid drops and counts the row instead
    assert pairs_of(d, skip_invalid=True) == ([], 1)
    assert good == row  # the converter never edits the row it reads


def test_a_dataset_without_ranking_is_refused_for_dpo_and_a_ranking_one_for_sft(tmp_path):
    (tmp_path / "plain.json").write_text(json.dumps([{"instruction": "Q", "output": "A"}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"plain": {"file_name": "plain.json"}}))
    spec, = resolve_datasets("plain", tmp_path)
    with pytest.raises(DataError, match=r"dataset 'plain' is not a preference dataset \(no `ranking: true`"):
        convert_pairs(load_rows(spec), spec, skip_invalid=True)

    from megatune.data.converters import convert_rows

    d = write_dataset(tmp_path, [{"instruction": "Q", "chosen": "A", "rejected": "B"}])
    spec, = resolve_datasets("pairs", d)
    with pytest.raises(DataError, match="ranking .* needs `stage: dpo`"):
        convert_rows(load_rows(spec), spec)


def test_encode_pair_row_returns_llama_factory_columns_or_the_error(tmp_path, tokenizer):
    spec, = resolve_datasets("pairs", write_dataset(tmp_path, [{}]))
    template = get_template("qwen")
    good = encode_pair_row({"instruction": "Q", "chosen": "Yes", "rejected": "No"}, 0, spec, template, tokenizer,
                           cutoff_len=64)
    assert good["error"] == "" and good["chosen_labels"][-3:] != [-100] * 3
    n = good["chosen_labels"].count(-100)
    assert good["chosen_input_ids"][:n] == good["rejected_input_ids"][:n]
    bad = encode_pair_row({"instruction": "Q", "chosen": "Yes"}, 7, spec, template, tokenizer, cutoff_len=64)
    assert "row 7: missing column 'rejected'" in bad["error"] and bad["chosen_input_ids"] == []


@pytest.mark.skipif(not LF_DATA.is_dir(), reason="LLaMA-Factory fixtures (../shared) not available")
def test_llama_factory_dpo_en_demo_encodes_like_the_real_chat_template():
    """Every row of dpo_en_demo.json converts and encodes; on every 6th row (single and multi-turn,
    with and without a system message) our prompt and answers, rendered with `qwen`, equal the real
    Qwen2.5 chat template's tokens (prompt with the generation prompt, prompt + answer)."""
    template_file = CHAT_TEMPLATES / "qwen2_5.jinja"
    if not template_file.exists():
        pytest.skip("Qwen2.5 chat template fixture not available")
    tok = make_tiny_tokenizer(chat_template=template_file.read_text(), family="qwen")
    spec, = resolve_datasets("dpo_en_demo", LF_DATA)
    pairs, skipped = convert_pairs(load_rows(spec), spec)
    assert (len(pairs), skipped) == (300, 0)
    raw = json.loads((LF_DATA / "dpo_en_demo.json").read_text())
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    truncated = 0
    compared = set()
    for index, (pair, row) in enumerate(zip(pairs, raw)):
        enc = encode_pair(get_template("qwen"), tok, pair)
        chosen, rejected = pair_samples(enc, cutoff_len=1024)
        assert len(chosen.input_ids) <= 1024 and len(rejected.input_ids) <= 1024
        truncated += chosen.truncated
        if index % 6:  # the real template (jinja) is slow: compare a sixth of the rows
            continue
        messages = [{"role": roles[m["from"]], "content": m["value"]} for m in row["conversations"]]
        compared.add((len(messages), messages[0]["role"]))
        prompt = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])
        assert enc.prompt_ids == prompt
        for side, ids in (("chosen", enc.chosen_ids), ("rejected", enc.rejected_ids)):
            full = tok.apply_chat_template(messages + [{"role": "assistant", "content": row[side]["value"]}],
                                           tokenize=True)
            full = list(full if isinstance(full, list) else full["input_ids"])
            assert enc.prompt_ids + ids == full
    # compared: single-turn, with a system message, and multi-turn prompts
    assert (1, "user") in compared and (2, "system") in compared and any(n >= 5 for n, _ in compared)
    assert truncated > 0  # the byte-level tiny tokenizer makes long rows: the rule is exercised


def test_bundled_megatune_pairs_encode(tokenizer):
    spec, = resolve_datasets("megatune_pairs", REPO / "data")
    pairs, skipped = convert_pairs(load_rows(spec), spec)
    assert len(pairs) >= 40 and skipped == 0
    for pair in pairs:
        chosen, rejected = pair_samples(encode_pair(get_template("qwen"), tokenizer, pair), cutoff_len=256)
        assert not chosen.truncated and chosen.input_ids != rejected.input_ids
