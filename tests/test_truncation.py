"""sft truncation and turn encoding, token for token as LLaMA-Factory 0.9.5 preprocesses.

The references below are written from LLaMA-Factory's documented rules, not from our code:
- the length split (its `infer_seqlen`): a response under half the budget stays whole, else a
  prompt under half stays whole, else the response gets int(budget * (response / total));
- turns take the budget in dialogue order, each from what the earlier ones left; with
  `mask_history` the order is reversed (the last turn first) and the kept turns are put back
  in dialogue order;
- every message is tokenized on its own (a template's strings slot by slot, special tokens
  as ids), so no token spans a prompt and an answer.
Tokenizer-level only: the offline tiny tokenizer, no model.
"""

from __future__ import annotations

import pytest

from megatune.data.conversation import Conversation, Message, Role
from megatune.data.pairwise import PreferencePair, encode_pair, pair_samples
from megatune.data.processors import IGNORE, supervised_sample
from megatune.data.templates import get_template
from megatune.tiny_tokenizer import make_tiny_tokenizer

U, A = Role.USER, Role.ASSISTANT


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer(family="qwen")  # base tokenizer: eos <|endoftext|>


def lf_reference(turns, cutoff_len, mask_history=False, train_on_prompt=False):
    """(input_ids, labels) by LLaMA-Factory's documented supervised rule (see the module doc)."""
    def split(src, tgt, budget):
        if tgt * 2 < budget:
            cap = budget
        elif src * 2 < budget:
            cap = budget - src
        else:
            cap = int(budget * (tgt / (src + tgt)))
        tgt_kept = min(cap, tgt)
        return min(max(budget - tgt_kept, 0), src), tgt_kept

    order = list(range(len(turns)))[::-1] if mask_history else list(range(len(turns)))
    pieces, total = {}, 0
    for rank, i in enumerate(order):
        if total >= cutoff_len:
            break
        src, tgt = turns[i]
        s, t = split(len(src), len(tgt), cutoff_len - total)
        total += s + t
        learn = rank == 0 if mask_history else True
        prompt_labels = src[:s] if train_on_prompt else [IGNORE] * s
        pieces[i] = (src[:s] + tgt[:t], prompt_labels + (tgt[:t] if learn else [IGNORE] * t))
    ids = [x for i in sorted(pieces) for x in pieces[i][0]]
    labels = [x for i in sorted(pieces) for x in pieces[i][1]]
    return ids, labels


def learned(ids, labels):
    return [t for t, lab in zip(ids, labels) if lab != IGNORE]


# ---------------------------------------------------------------------------------------------
# (a) mask_history: the last turn is served first


def _long_history(tok, template):
    """A two-turn chat whose first answer is long: its first turn takes 225-255 tokens, the
    second turn about 45, so the whole is longer than both cutoffs tested."""
    first = ""
    words = "The sea is wide and blue, the waves are white and the wind is strong today. "
    while True:
        first += words
        conv = Conversation([Message(U, "Please write a short poem about the sea."), Message(A, first),
                             Message(U, "What is the capital of France? Answer in one short sentence."),
                             Message(A, "The capital of France is Paris.")])
        turns = template.encode(tok, conv)
        if len(turns[0][0]) + len(turns[0][1]) >= 225:
            return conv, turns


@pytest.mark.parametrize("cutoff_len", [96, 265])
def test_mask_history_keeps_the_last_turn_and_cuts_history(tok, cutoff_len):
    template = get_template("qwen")
    conv, turns = _long_history(tok, template)
    (p0, r0), (p1, r1) = turns
    assert 225 <= len(p0) + len(r0) <= 255 and len(p1) + len(r1) < 96  # the premise of the case
    sample = supervised_sample(turns, cutoff_len, mask_history=True)
    assert sample is not None and sample.truncated
    assert (sample.input_ids, sample.labels) == lf_reference(turns, cutoff_len, mask_history=True)
    assert len(sample.input_ids) == cutoff_len
    # the last question is whole, with its assistant header, and the last answer is what is learned
    text = tok.decode(sample.input_ids)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France? Answer in one short sentence.<|im_end|>\n"
                         "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n")
    assert tok.decode(learned(sample.input_ids, sample.labels)) == "The capital of France is Paris.<|im_end|>\n"
    # the history is what was cut: part of the first turn, then the whole last turn
    history = sample.input_ids[: cutoff_len - len(p1) - len(r1)]
    assert 0 < len(history) < len(p0) + len(r0) and history[:1] == p0[:1]


# ---------------------------------------------------------------------------------------------
# (b) a later turn with little budget left learns no orphan answer token


def test_later_turn_with_little_budget_learns_nothing_of_its_answer(tok):
    template = get_template("qwen")
    conv = Conversation([
        Message(U, "Please write a short poem about the sea, the waves and the wind."),
        Message(A, "The sea is wide and blue, the waves are white."),
        Message(U, "Now translate the following sentence into English and summarize the text below in one sentence."),
        Message(A, "Yes."),
    ])
    turns = template.encode(tok, conv)
    (p0, r0), (p1, r1) = turns
    first = len(p0) + len(r0)
    assert len(r1) * 3 < len(p1) + len(r1)  # a short answer after a long question: the split gives it 0 of 1-3
    for cutoff_len in (first + 1, first + 2, first + 3):
        sample = supervised_sample(turns, cutoff_len)
        ids, labels = lf_reference(turns, cutoff_len)
        assert (sample.input_ids, sample.labels) == (ids, labels), cutoff_len
        # only the first answer is learned; the second turn contributes question tokens only
        assert learned(sample.input_ids, sample.labels) == r0, cutoff_len
        assert sample.input_ids == p0 + r0 + p1[: cutoff_len - first], cutoff_len


def test_one_split_for_text_pairs_and_images():
    """processors.infer_seqlen is the only implementation: pairs and image rows import it."""
    import megatune.data.multimodal as multimodal
    import megatune.data.pairwise as pairwise
    import megatune.data.processors as processors

    assert pairwise.infer_seqlen is processors.infer_seqlen
    assert multimodal.keep_lengths is processors.keep_lengths
    assert not hasattr(processors, "split_budget")


# ---------------------------------------------------------------------------------------------
# (c) no token spans a prompt and an answer: every answer character is learned


def _plain_case(name, tok, question, answer):
    """The LLaMA-Factory token sequence of one turn of `empty` / `default`, slot by slot."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    if name == "empty":
        return enc(question), enc(answer)
    return enc("Human: " + question) + [eos] + enc("\nAssistant:"), enc(answer) + [eos] + enc("\n")


@pytest.mark.parametrize("name,question,answer", [
    # the prompt ends in spaces: a token " Paris" / " the" would start in the prompt
    ("empty", "Where is it?  ", "Paris is the capital."),
    ("empty", "Question:  ", "the sea"),
    # `default` prompts end in "Assistant:": an answer opening with a newline would join ":\n"
    ("default", "Say it", "\nMagnetron"),
    ("default", "Say it  ", "\n\nThe answer is 20."),
])
def test_every_answer_character_is_learned(tok, name, question, answer):
    template = get_template(name)
    conv = Conversation([Message(U, question), Message(A, answer)])
    prompt, response = _plain_case(name, tok, question, answer)
    turns = template.encode(tok, conv)
    sample = supervised_sample(turns, 1024)
    ending = "" if name == "empty" else tok.eos_token + "\n"
    assert tok.decode(learned(sample.input_ids, sample.labels)) == answer + ending
    assert turns == [(prompt, response)]  # LLaMA-Factory's tokens
    # the same for a preference pair (prompt from the chosen rendering, both answers whole)
    pair = PreferencePair(Conversation([Message(U, question)]), Message(A, answer), Message(A, "No" + answer))
    chosen, rejected = pair_samples(encode_pair(template, tok, pair), 1024)
    assert tok.decode(learned(chosen.input_ids, chosen.labels)) == answer + ending
    assert tok.decode(learned(rejected.input_ids, rejected.labels)) == "No" + answer + ending


def test_auto_template_learns_every_answer_character(tok):
    """`auto` keeps the full rendering's tokens, except where one would cross a turn boundary."""
    auto_tok = make_tiny_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    conv = Conversation([Message(U, "Where is it?  "), Message(A, "Paris is the capital.")])
    (prompt, response), = get_template("auto").encode(auto_tok, conv)
    assert auto_tok.decode(response) == "Paris is the capital."
    assert response == auto_tok("Paris is the capital.", add_special_tokens=False)["input_ids"]
    assert auto_tok.decode(prompt) == "Where is it?  "
    # without a crossing token the full rendering's tokens are kept
    conv = Conversation([Message(U, "Where is it?"), Message(A, "Paris is the capital.")])
    (prompt, response), = get_template("auto").encode(auto_tok, conv)
    assert prompt + response == auto_tok("Where is it?Paris is the capital.", add_special_tokens=False)["input_ids"]
