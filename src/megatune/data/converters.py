"""Dataset formats -> the canonical `Conversation`.

Formats (LLaMA-Factory's `formatting` key):
- alpaca: prompt (+ query, joined with a newline), response, optional system, history
  ([[question, answer], ...] before the current turn), tools, images.
- sharegpt: a list of {from, value} messages; human/gpt/observation/function_call/system by
  default, renamed through `tags`.
- openai: a list of {role, content} messages with user/assistant/tool/system roles; assistant
  `tool_calls` become a function-call turn.
- stage `pt`: the text column (`columns.prompt`, default "text") becomes one assistant message.

Every problem raises `DataError` naming the row (the `source` string) and what to do.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable

from megatune.data.conversation import Conversation, Message, Role
from megatune.data.registry import DataError, DatasetSpec, describe_row

log = logging.getLogger(__name__)

PROMPT_SIDE = (Role.USER, Role.TOOL)
ANSWER_SIDE = (Role.ASSISTANT, Role.FUNCTION)
UNSUPPORTED_MEDIA = ("videos", "audios")


def to_conversation(row: dict, spec: DatasetSpec, source: str, stage: str = "sft") -> Conversation:
    """Convert one raw row of `spec`'s dataset; `source` locates the row in error messages."""
    if stage == "pt":
        return _pretrain(row, spec, source)
    if spec.ranking:
        raise DataError(
            f"{source}: dataset '{spec.name}' is a ranking (preference) dataset, which needs `stage: dpo` "
            f"(see megatune.data.pairwise); for stage {stage} pick a dataset without `ranking: true`"
        )
    for media in UNSUPPORTED_MEDIA:
        if spec.columns.get(media) and row.get(spec.columns[media]):
            raise DataError(
                f"{source}: column '{spec.columns[media]}' holds {media}, which megatune does not support yet; "
                f"remove `columns.{media}` of '{spec.name}' from dataset_info.json or drop those rows"
            )
    if spec.formatting == "alpaca":
        conv = parse_alpaca(row, spec, source)
    else:
        conv = parse_chat(row, spec, source)
    conv.tools = parse_tools(optional_column(row, spec, "tools", source), source)
    conv.images = parse_images(optional_column(row, spec, "images", source), spec, source)
    conv.source = source
    return conv


def convert_rows(
    rows: Iterable[dict], spec: DatasetSpec, skip_invalid: bool = False, stage: str = "sft"
) -> tuple[list[Conversation], int]:
    """Convert all rows; with `skip_invalid` bad rows are dropped and counted instead of raising."""
    if spec.ranking and stage != "pt":  # a whole-dataset problem: never skipped row by row
        to_conversation({}, spec, f"dataset '{spec.name}'", stage)
    out: list[Conversation] = []
    skipped = 0
    for index, row in enumerate(rows):
        source = f"dataset '{spec.name}', file {spec.path()}, row {index}"
        try:
            out.append(to_conversation(row, spec, source, stage))
        except DataError as err:
            if not skip_invalid:
                detailed = describe_row(spec, index)  # adds the jsonl line number
                raise DataError(str(err).replace(source, detailed, 1)) from None
            if skipped == 0:
                log.warning("skipping invalid rows (skip_invalid: true); first: %s", err)
            skipped += 1
    return out, skipped


# ---------------------------------------------------------------------------------------------
# Columns


def missing_column_error(row: dict, spec: DatasetSpec, key: str, column: str, source: str) -> DataError:
    return DataError(
        f"{source}: missing column '{column}' (the {key} of a {spec.formatting} dataset); found columns "
        f"{sorted(row)}; rename the data's column or set `columns.{key}` of '{spec.name}' in dataset_info.json"
    )


def required_column(row: dict, spec: DatasetSpec, key: str, source: str) -> Any:
    column = spec.column(key)
    if column not in row:
        raise missing_column_error(row, spec, key, column, source)
    return row[column]


def optional_column(row: dict, spec: DatasetSpec, key: str, source: str) -> Any:
    """The value of a column that is on by default or configured; None when off or empty.
    A column the user configured explicitly must exist."""
    column = spec.column(key)
    if column is None:
        return None
    if column not in row:
        if key in spec.columns:
            raise missing_column_error(row, spec, key, column, source)
        return None
    return row[column]


def text_value(value: Any, what: str, source: str) -> str:
    """A text field: None -> "", numbers (e.g. from csv) -> str, anything else is an error."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{source}: {what} must be text, got {type(value).__name__}: {str(value)[:80]}")


def _pretrain(row: dict, spec: DatasetSpec, source: str) -> Conversation:
    column = spec.columns.get("prompt") or "text"
    if column not in row:
        raise missing_column_error(row, spec, "prompt", column, source)
    text = text_value(row[column], f"text column '{column}'", source)
    if not text.strip():
        raise DataError(f"{source}: empty text in column '{column}'; remove the row or set skip_invalid: true")
    return Conversation(messages=[Message(Role.ASSISTANT, text)], source=source)


# ---------------------------------------------------------------------------------------------
# alpaca


def parse_alpaca(row: dict, spec: DatasetSpec, source: str) -> Conversation:
    prompt = text_value(required_column(row, spec, "prompt", source), f"column '{spec.column('prompt')}'", source)
    query = text_value(optional_column(row, spec, "query", source), f"column '{spec.column('query')}'", source)
    response = required_column(row, spec, "response", source)
    if isinstance(response, list):
        raise DataError(f"{source}: response column '{spec.column('response')}' holds a list; sft needs one answer")
    response = text_value(response, f"column '{spec.column('response')}'", source)
    user = "\n".join(part for part in (prompt, query) if part)
    if not user.strip():
        raise DataError(f"{source}: empty prompt (columns '{spec.column('prompt')}' and '{spec.column('query')}')")
    if not response.strip():
        raise DataError(
            f"{source}: empty response in column '{spec.column('response')}'; "
            f"write an answer or remove the row (or set skip_invalid: true)"
        )
    messages = []
    history = optional_column(row, spec, "history", source) or []
    if not isinstance(history, list):
        raise DataError(f"{source}: history must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"{source}: history item {i} must be a [question, answer] pair of strings, got {pair!r}")
        if not pair[1].strip():
            raise DataError(f"{source}: empty response in history item {i}")
        messages += [Message(Role.USER, pair[0]), Message(Role.ASSISTANT, pair[1])]
    messages += [Message(Role.USER, user), Message(Role.ASSISTANT, response)]
    system = text_value(optional_column(row, spec, "system", source), "system", source) or None
    return Conversation(messages=messages, system=system)


# ---------------------------------------------------------------------------------------------
# sharegpt / openai


def parse_chat(row: dict, spec: DatasetSpec, source: str) -> Conversation:
    raw = required_column(row, spec, "messages", source)
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{source}: column '{spec.column('messages')}' must be a non-empty list of messages")
    role_tag, content_tag = spec.tag("role_tag"), spec.tag("content_tag")
    roles = {
        spec.tag("user_tag"): Role.USER,
        spec.tag("observation_tag"): Role.TOOL,
        spec.tag("assistant_tag"): Role.ASSISTANT,
        spec.tag("function_tag"): Role.FUNCTION,
    }
    system_tag = spec.tag("system_tag")
    system = text_value(optional_column(row, spec, "system", source), "system", source) or None
    messages: list[Message] = []
    for pos, msg in enumerate(raw):
        if not isinstance(msg, dict) or role_tag not in msg:
            found = sorted(msg) if isinstance(msg, dict) else type(msg).__name__
            raise DataError(
                f"{source}: message {pos} has no '{role_tag}' key (found {found}); check `tags` of '{spec.name}'"
            )
        tag = msg[role_tag]
        if tag == system_tag and pos == 0:
            system = text_value(msg.get(content_tag), f"message {pos}", source) or None
            continue
        if tag not in roles:
            raise DataError(
                f"{source}: message {pos} has role '{tag}'; expected one of {[t for t in roles if t]}"
                + (" (a system message may only come first)" if tag == system_tag else
                   f"; if the data names its roles differently, map them in the `tags` block of "
                   f"'{spec.name}' in dataset_info.json (user_tag, assistant_tag, observation_tag, "
                   f"function_tag, system_tag)")
            )
        role = roles[tag]
        if spec.formatting == "openai" and role == Role.ASSISTANT and msg.get("tool_calls"):
            if text_value(msg.get(content_tag), f"message {pos}", source).strip():
                raise DataError(f"{source}: message {pos} has both text and tool_calls; split it into two messages")
            role, content = Role.FUNCTION, _openai_calls(msg["tool_calls"], pos, source)
        else:
            if content_tag not in msg:
                raise DataError(f"{source}: message {pos} has no '{content_tag}' key (found {sorted(msg)})")
            content = text_value(msg[content_tag], f"message {pos} content", source)
        expected = PROMPT_SIDE if len(messages) % 2 == 0 else ANSWER_SIDE
        if role not in expected:
            side = "prompt-side (user/tool)" if expected is PROMPT_SIDE else "answer-side (assistant/function)"
            raise DataError(
                f"{source}: message {pos} has role '{tag}' where a {side} turn was expected; turns must "
                f"alternate prompt and answer, starting with a prompt; fix the order or remove the row"
            )
        if role in ANSWER_SIDE and not content.strip():
            raise DataError(f"{source}: empty response in message {pos}; write an answer or remove the row")
        if role == Role.FUNCTION:
            content = _function_calls(content, pos, source)
        messages.append(Message(role, content))
    if not messages:
        raise DataError(f"{source}: no messages besides the system prompt")
    if messages[-1].role not in ANSWER_SIDE:
        raise DataError(f"{source}: the last message ({len(raw) - 1}) is a prompt with no answer; add one or drop it")
    return Conversation(messages=messages, system=system)


def _function_calls(content: str, pos: int, source: str) -> str:
    """A function-call turn as a JSON list of {"name", "arguments"} (one call may be an object)."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError:
        raise DataError(f"{source}: message {pos} is a function call but not valid JSON: {content[:80]!r}") from None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not all(isinstance(c, dict) and "name" in c for c in calls):
        raise DataError(f"{source}: message {pos}: a function call must be an object with 'name' and 'arguments'")
    return json.dumps(calls, ensure_ascii=False)


def _openai_calls(tool_calls: Any, pos: int, source: str) -> str:
    calls = []
    for call in tool_calls if isinstance(tool_calls, list) else [tool_calls]:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or "name" not in fn:
            raise DataError(f"{source}: message {pos}: each tool_calls item needs function.name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        calls.append({"name": fn["name"], "arguments": args})
    return json.dumps(calls, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# tools and images


def parse_tools(value: Any, source: str) -> str | None:
    """Tool schemas as a JSON string (kept as given when it is already a string)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{source}: tools must be JSON (a list of tool schemas): {value[:80]!r}") from None
        return value
    return json.dumps(value, ensure_ascii=False)


def parse_images(value: Any, spec: DatasetSpec, source: str) -> list:
    """A row's images, in order: paths (a relative path is taken from dataset_dir when the file is
    there) or what the `datasets` Image feature yields ({"path", "bytes"} dicts, bytes, PIL
    images), kept as given. `megatune.data.images.to_image_ref` checks the files when encoding."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for k, p in enumerate(items):
        if isinstance(p, str):
            joined = os.path.join(spec.dataset_dir, p)
            out.append(joined if spec.dataset_dir and not os.path.isabs(p) and os.path.exists(joined) else p)
        elif isinstance(p, (bytes, dict)) or type(p).__module__.startswith("PIL."):
            out.append(p)
        else:
            raise DataError(
                f"{source}: image {k} of column '{spec.column('images')}' is a {type(p).__name__}; images must be "
                f"file paths (relative to dataset_dir or absolute), image bytes or {{'path', 'bytes'}} dicts"
            )
    return out
