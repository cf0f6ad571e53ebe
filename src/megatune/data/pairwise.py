"""Preference pairs for `stage: dpo`: LLaMA-Factory's pairwise rows -> prompt + chosen + rejected
-> two training samples.

Rows (a `ranking: true` entry of dataset_info.json):
- alpaca: the prompt from `prompt` (+ `query`, joined with a newline), optional `system` and
  `history`; `chosen` and `rejected` hold the two answers as text.
- sharegpt / openai: `messages` hold the prompt (optionally a system message first, then turns
  alternating prompt and answer, ending with a user or observation turn); `chosen` and `rejected`
  each hold one answer message ({"from": "gpt", "value": ...} in sharegpt, as in LLaMA-Factory's
  dpo_en_demo.json; a plain string is taken as an assistant message).
The `chosen`/`rejected` column names default to "chosen" and "rejected" (LLaMA-Factory makes you
set them in `columns`; both work).

Encoding (LLaMA-Factory's pairwise processor): the conversation is rendered once with the chosen
and once with the rejected answer; everything before the last answer is the prompt (earlier turns
included, all masked), shared by both. Under `cutoff_len` the prompt and the responses are cut by
LLaMA-Factory's `infer_seqlen`, with the response length taken as the longer of chosen and rejected,
so both responses are cut to the same budget. The result is two samples, prompt + chosen and
prompt + rejected, whose labels mask the prompt with -100.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from megatune.data.conversation import Conversation, Message
from megatune.data.converters import (
    UNSUPPORTED_MEDIA,
    missing_column_error,
    optional_column,
    parse_alpaca,
    parse_chat,
    parse_images,
    parse_tools,
    required_column,
    text_value,
)
from megatune.data.processors import IGNORE, Sample, infer_seqlen
from megatune.data.registry import DataError, DatasetSpec, describe_row

SIDES = ("chosen", "rejected")


@dataclass
class PreferencePair:
    """One preference row in canonical form.

    prompt: the conversation up to the answer being compared; its messages end with a prompt-side
        turn (user or tool); `system`, `tools`, `images` and `source` apply to both answers.
    chosen, rejected: the preferred and the dispreferred answer (assistant or function role).
    """

    prompt: Conversation
    chosen: Message
    rejected: Message

    def conversation(self, side: str) -> Conversation:
        """The prompt followed by the `side` ("chosen" or "rejected") answer."""
        answer = {"chosen": self.chosen, "rejected": self.rejected}[side]
        p = self.prompt
        return Conversation(messages=[*p.messages, answer], system=p.system, tools=p.tools,
                            images=list(p.images), source=p.source)


# ---------------------------------------------------------------------------------------------
# Rows -> pairs


def _require_ranking(spec: DatasetSpec, source: str) -> None:
    if not spec.ranking:
        raise DataError(
            f"{source}: dataset '{spec.name}' is not a preference dataset (no `ranking: true` in "
            f"dataset_info.json); stage dpo needs rows with a chosen and a rejected answer"
        )


def _answer_value(row: dict, spec: DatasetSpec, side: str, source: str) -> Any:
    value = required_column(row, spec, side, source)
    if value is None or value == "" or value == {} or value == []:
        raise DataError(
            f"{source}: no {side} answer (column '{spec.column(side)}' is empty); a preference row needs both a "
            f"chosen and a rejected answer: fill it in or remove the row (or set skip_invalid: true)"
        )
    return value


def to_preference_pair(row: dict, spec: DatasetSpec, source: str) -> PreferencePair:
    """Convert one raw row of a `ranking: true` dataset; `source` ("dataset 'x', file f, row i")
    starts every error message. Raises DataError for a dataset without `ranking: true`, a missing
    or empty chosen/rejected column, an answer of the wrong type or role, and every problem the
    sft converters report for the prompt part (roles out of order, empty prompt, ...)."""
    _require_ranking(spec, source)
    for media in UNSUPPORTED_MEDIA:
        if spec.columns.get(media) and row.get(spec.columns[media]):
            raise DataError(f"{source}: column '{spec.columns[media]}' holds {media}, which megatune does not support yet")
    values = {side: _answer_value(row, spec, side, source) for side in SIDES}
    if spec.formatting == "alpaca":
        convs = {side: _alpaca_side(row, spec, side, values[side], source) for side in SIDES}
    else:
        convs = {side: _chat_side(row, spec, side, values[side], source) for side in SIDES}
    chosen = convs["chosen"]
    prompt = Conversation(
        messages=chosen.messages[:-1],
        system=chosen.system,
        tools=parse_tools(optional_column(row, spec, "tools", source), source),
        images=parse_images(optional_column(row, spec, "images", source), spec, source),
        source=source,
    )
    return PreferencePair(prompt=prompt, chosen=chosen.messages[-1], rejected=convs["rejected"].messages[-1])


def _alpaca_side(row: dict, spec: DatasetSpec, side: str, value: Any, source: str) -> Conversation:
    column = spec.column(side)
    if not isinstance(value, str):
        raise DataError(
            f"{source}: the {side} answer (column '{column}') of an alpaca preference row must be text, "
            f"got {type(value).__name__}: {str(value)[:80]}"
        )
    if not value.strip():
        raise DataError(f"{source}: empty {side} answer in column '{column}'; write one or remove the row")
    # The alpaca converter reads the answer from the response column: put this side's answer there.
    return parse_alpaca({**row, spec.column("response"): value}, spec, source)


def _chat_side(row: dict, spec: DatasetSpec, side: str, value: Any, source: str) -> Conversation:
    column = spec.column(side)
    role_tag, content_tag = spec.tag("role_tag"), spec.tag("content_tag")
    answer_tags = [t for t in (spec.tag("assistant_tag"), spec.tag("function_tag")) if t]
    prompt_tags = [t for t in (spec.tag("user_tag"), spec.tag("observation_tag")) if t]
    if isinstance(value, str):
        value = {role_tag: spec.tag("assistant_tag"), content_tag: value}
    if isinstance(value, list):
        raise DataError(
            f"{source}: the {side} answer (column '{column}') is a list; LLaMA-Factory's pairwise format "
            f"holds one message there, e.g. {{\"{role_tag}\": \"{answer_tags[0]}\", \"{content_tag}\": \"...\"}}"
        )
    if not isinstance(value, dict) or role_tag not in value:
        found = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise DataError(f"{source}: the {side} answer (column '{column}') must be a message with a '{role_tag}' key, found {found}")
    if value[role_tag] not in answer_tags:
        raise DataError(
            f"{source}: the {side} answer (column '{column}') has role '{value[role_tag]}'; it must be one of "
            f"{answer_tags} (an answer to the prompt)"
        )
    tool_calls = spec.formatting == "openai" and value.get("tool_calls")
    if not tool_calls and not text_value(value.get(content_tag), f"the {side} answer", source).strip():
        raise DataError(f"{source}: empty {side} answer in column '{column}'; write one or remove the row")

    messages_column = spec.column("messages")
    raw = row.get(messages_column)
    if messages_column not in row:
        raise missing_column_error(row, spec, "messages", messages_column, source)
    if not isinstance(raw, list):
        raise DataError(f"{source}: column '{messages_column}' must be a list of messages (the prompt)")
    body = [m for k, m in enumerate(raw) if not (k == 0 and isinstance(m, dict) and m.get(role_tag) == spec.tag("system_tag"))]
    last = body[-1].get(role_tag) if body and isinstance(body[-1], dict) else None
    if not body or last not in prompt_tags:
        found = f"it ends with a '{last}' turn" if body else "it holds no turn besides a system message"
        raise DataError(
            f"{source}: the prompt in column '{messages_column}' must end with a user or observation turn "
            f"({prompt_tags}) that the chosen and rejected answers reply to; {found}"
        )
    try:
        return parse_chat({**row, messages_column: [*raw, value]}, spec, source)
    except DataError as err:  # the answer was appended as message len(raw): name it by its column
        raise DataError(re.sub(rf"\bmessage {len(raw)}\b", f"the {side} answer (column '{column}')", str(err))) from None


def convert_pairs(rows: Iterable[dict], spec: DatasetSpec, skip_invalid: bool = False) -> tuple[list[PreferencePair], int]:
    """Convert all rows of a ranking dataset; with `skip_invalid` bad rows are dropped and counted.
    A dataset without `ranking: true` is refused as a whole (never skipped row by row)."""
    _require_ranking(spec, f"dataset '{spec.name}'")
    out: list[PreferencePair] = []
    skipped = 0
    for index, row in enumerate(rows):
        source = f"dataset '{spec.name}', file {spec.path()}, row {index}"
        try:
            out.append(to_preference_pair(row, spec, source))
        except DataError as err:
            if not skip_invalid:
                raise DataError(str(err).replace(source, describe_row(spec, index), 1)) from None
            skipped += 1
    return out, skipped


# ---------------------------------------------------------------------------------------------
# Pairs -> token ids -> samples


@dataclass
class EncodedPair:
    """Token ids of a pair: the shared prompt (all turns before the compared answer, with the
    generation header) and each response (answer plus its end-of-turn tokens)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def encode_pair(template, tokenizer, pair: PreferencePair, enable_thinking: bool = True) -> EncodedPair:
    """Render and tokenize prompt + chosen and prompt + rejected with a template from
    megatune.data.templates. The prompt ids are taken from the chosen rendering (as LLaMA-Factory
    does); with the named templates the prompt ends at a turn boundary, so both renderings
    tokenize it alike."""
    ids = {}
    prompt_ids: list[int] = []
    for side in SIDES:
        turns = template.encode(tokenizer, pair.conversation(side), enable_thinking=enable_thinking)
        if side == "chosen":
            prompt_ids = [t for p, r in turns[:-1] for t in p + r] + turns[-1][0]
        ids[side] = turns[-1][1]
    return EncodedPair(prompt_ids, ids["chosen"], ids["rejected"])


def truncate_pair(encoded: EncodedPair, cutoff_len: int) -> tuple[EncodedPair, bool]:
    """Cut a pair to at most `cutoff_len` tokens per sample (LLaMA-Factory's pairwise rule: the
    response budget comes from processors.infer_seqlen with the LONGER of chosen and rejected, and both
    responses are cut to it). Returns (the cut pair, whether anything was cut)."""
    longer = max(len(encoded.chosen_ids), len(encoded.rejected_ids))
    keep_prompt, keep_response = infer_seqlen(len(encoded.prompt_ids), longer, cutoff_len)
    cut = EncodedPair(
        encoded.prompt_ids[:keep_prompt], encoded.chosen_ids[:keep_response], encoded.rejected_ids[:keep_response]
    )
    return cut, (keep_prompt, keep_response) != (len(encoded.prompt_ids), longer)


def pair_samples(encoded: EncodedPair, cutoff_len: int, source: str = "pair") -> tuple[Sample, Sample]:
    """(chosen sample, rejected sample) after truncation: input_ids = prompt + response, labels =
    -100 over the prompt then the response ids (aligned with the inputs; the collator shifts).
    Raises DataError (starting with `source`) when truncation leaves a response empty."""
    cut, truncated = truncate_pair(encoded, cutoff_len)
    if not cut.chosen_ids or not cut.rejected_ids:
        raise DataError(
            f"{source}: nothing of the responses is left after truncation to cutoff_len={cutoff_len} "
            f"(prompt {len(encoded.prompt_ids)} tokens); raise cutoff_len or shorten the prompt"
        )
    masked = [IGNORE] * len(cut.prompt_ids)
    return tuple(
        Sample(cut.prompt_ids + ids, masked + ids, truncated=truncated) for ids in (cut.chosen_ids, cut.rejected_ids)
    )


PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "truncated", "error")


def encode_pair_row(
    row: dict,
    index: int,
    spec: DatasetSpec,
    template,
    tokenizer,
    *,
    cutoff_len: int,
    enable_thinking: bool = True,
    file_label: str | None = None,
) -> dict:
    """One raw row -> the PAIR_COLUMNS (LLaMA-Factory's column names), for `datasets.map` like the
    pipeline's sft encoder: errors come back in "error" (empty when fine) so skip_invalid can
    count them instead of stopping."""
    source = f"dataset '{spec.name}', {file_label or f'file {spec.file_name}'}, row {index}"
    try:
        pair = to_preference_pair(row, spec, source)
        chosen, rejected = pair_samples(encode_pair(template, tokenizer, pair, enable_thinking), cutoff_len, source)
    except DataError as err:
        return {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [], "rejected_labels": [],
                "truncated": False, "error": str(err)}
    return {
        "chosen_input_ids": chosen.input_ids,
        "chosen_labels": chosen.labels,
        "rejected_input_ids": rejected.input_ids,
        "rejected_labels": rejected.labels,
        "truncated": chosen.truncated,
        "error": "",
    }


__all__ = [
    "EncodedPair",
    "PAIR_COLUMNS",
    "PreferencePair",
    "convert_pairs",
    "encode_pair",
    "encode_pair_row",
    "pair_samples",
    "to_preference_pair",
    "truncate_pair",
]
