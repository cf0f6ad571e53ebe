"""The one canonical form every dataset format is converted into."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Role(str, Enum):
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"  # a tool's result (LLaMA-Factory's "observation")
    FUNCTION = "function"  # an assistant turn that calls tools (content: JSON list of calls)


@dataclass
class Message:
    role: Role
    content: str


@dataclass
class Conversation:
    """A chat sample. `messages` alternate prompt-side turns (user/tool) and answers
    (assistant/function) and end with an answer for sft; for `pt` a single assistant message
    holds the raw text."""

    messages: list[Message]
    system: str | None = None
    tools: str | None = None  # JSON string with a list of tool schemas, as in LLaMA-Factory
    # images in placeholder order: paths, or {"path", "bytes"} dicts / bytes / PIL images (data/images.py)
    images: list = field(default_factory=list)
    source: str = ""  # "dataset 'x', file f.json, row 12" for error messages
