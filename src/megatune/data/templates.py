"""Chat templates: render a `Conversation` into (prompt, response) token turns.

Named templates follow LLaMA-Factory's names and conventions (a user turn ends with the assistant
header, a response is the answer plus its end-of-turn tokens). Where a model ships a chat
template, ours renders the same tokens as `tokenizer.apply_chat_template` (see the tests).
`auto` uses the tokenizer's own chat template and finds the turn boundaries by rendering prefixes.

Every template works in text first (`render` -> [(prompt_text, response_text)]). Named
templates then tokenize each prompt and each answer on their own, as LLaMA-Factory does
(`tokenize_segments`), so every answer character is in the answer's tokens; `auto` tokenizes
the whole text once and cuts the ids at the turn boundaries (`tokenize_turns`), falling back to
the former where a token would cross one.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

from megatune.data.conversation import Conversation, Message, Role

TextTurns = list[tuple[str, str]]
TokenTurns = list[tuple[list[int], list[int]]]

PROMPT_ROLES = (Role.USER, Role.TOOL)
ANSWER_ROLES = (Role.ASSISTANT, Role.FUNCTION)


# ---------------------------------------------------------------------------------------------
# Tool schemas and calls
# ---------------------------------------------------------------------------------------------


def parse_tools(tools: str | list | None) -> list[dict]:
    """Tool schemas as OpenAI-style {"type": "function", "function": {...}} dicts."""
    if not tools:
        return []
    parsed = json.loads(tools) if isinstance(tools, str) else tools
    if isinstance(parsed, dict):
        parsed = [parsed]
    return [t if t.get("type") == "function" and "function" in t else {"type": "function", "function": t}
            for t in parsed]


def parse_calls(content: str) -> list[dict]:
    """A function turn's content (JSON list of, or one, {"name", "arguments"}) as a list of calls
    whose arguments are decoded to JSON values where they were given as JSON strings."""
    try:
        parsed = json.loads(content)
    except json.JSONDecodeError as e:
        raise ValueError(f"function turn is not valid JSON: {content[:200]!r}") from e
    calls = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for call in calls:
        if "function" in call:  # OpenAI style {"type": "function", "function": {...}}
            call = call["function"]
        args = call.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass  # keep a non-JSON string as is
        out.append({"name": call["name"], "arguments": args})
    return out


def _dumps(obj, **kw) -> str:
    # Same as transformers' `tojson` filter in chat templates.
    return json.dumps(obj, ensure_ascii=False, **kw)


def split_thought(content: str) -> tuple[str, str]:
    """(reasoning, answer) of "<think>reasoning</think>answer", the way Qwen3's template splits it."""
    if "</think>" not in content:
        return "", content
    head, _, _ = content.partition("</think>")
    reasoning = head.rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


# Tool styles: how tool schemas join the system prompt, and how calls are written.

_REACT_TOOLS = (
    "You have access to the following tools:\n{tools}\n\n"
    "Use the following format if using a tool:\n```\nAction: tool name (one of [{names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n```'
)

_QWEN_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)

_LLAMA3_TOOLS = (
    "You have access to the following functions. To call a function, respond with JSON in the format "
    '{{"name": function name, "parameters": dictionary of argument name and its value}}. '
    "Do not use variables.\n\n{tools}"
)


def format_tools(style: str, tools: list[dict]) -> str:
    """The tool section appended to the system prompt."""
    fns = [t["function"] for t in tools]
    if style == "qwen":
        return _QWEN_TOOLS.format(tools="".join("\n" + _dumps(t) for t in tools))
    if style == "llama3":
        return _LLAMA3_TOOLS.format(tools="\n\n".join(_dumps(f, indent=4) for f in fns))
    if style == "mistral":
        return f"[AVAILABLE_TOOLS] {_dumps(tools)}[/AVAILABLE_TOOLS]"
    lines = []
    for f in fns:
        params = f.get("parameters", {})
        lines.append(f"> Tool Name: {f['name']}\nTool Description: {f.get('description', '')}\n"
                     f"Tool Args: {_dumps(params.get('properties', {}))}")
    return _REACT_TOOLS.format(tools="\n".join(lines), names=", ".join(f["name"] for f in fns))


def format_calls(style: str, calls: list[dict]) -> str:
    """An assistant turn that calls tools, without the end-of-turn token."""
    if style == "qwen":
        return "\n".join(f'<tool_call>\n{{"name": "{c["name"]}", "arguments": {_dumps(c["arguments"])}}}\n</tool_call>'
                         for c in calls)
    if style == "llama3":
        return "\n".join(_dumps({"name": c["name"], "parameters": c["arguments"]}) for c in calls)
    if style == "mistral":
        return "[TOOL_CALLS] " + _dumps(calls)
    return "".join(f"Action: {c['name']}\nAction Input: {_dumps(c['arguments'])}\n" for c in calls)


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------


@dataclass
class Template:
    """A chat format made of per-role format strings ("{content}", "{bos}", "{eos}" are filled in).

    prefix: once at the start (e.g. "{bos}"); system: the system prompt (with tools appended);
    user / observation: prompt-side turns; header: opens every answer (the generation prompt);
    assistant / function: answers, including the end-of-turn tokens.
    """

    name: str
    user: str = "{content}"
    assistant: str = "{content}{eos}"
    system: str = "{content}"
    header: str = ""
    observation: str | None = None  # None: like `user`
    function: str | None = None  # None: like `assistant`
    prefix: str = ""
    default_system: str = ""
    tool_style: str = "default"
    stop_words: list[str] = field(default_factory=list)
    replace_eos: bool = False  # LLaMA-Factory: the tokenizer's eos becomes stop_words[0]
    system_in_user: bool = False  # Llama-2/Mistral: the system text opens the first user turn
    image_text: str | None = None  # what an "<image>" placeholder in a user turn becomes
    # The token inside `image_text` that stands for the image's features; multimodal encoding
    # (data/multimodal.py) repeats it once per image token (Qwen2-VL: t*h*w / merge_size**2).
    image_token: str | None = None

    # -- public API ---------------------------------------------------------------------------

    def encode(self, tokenizer, conversation: Conversation, enable_thinking: bool = True) -> TokenTurns:
        """(prompt_ids, response_ids) per answer, LLaMA-Factory's way (`tokenize_segments`):
        every prompt and every response is tokenized on its own, and the first prompt's head
        (prefix + system block) apart from the rest, so an answer's tokens are exactly the
        tokenization of the answer text. Where prompt and answer meet at a special token or a
        newline (chatml, qwen, llama3) this equals tokenizing the whole rendering, which the
        tests check against the models' own chat templates."""
        turns = self.render(conversation, tokenizer, enable_thinking)
        ctx = self._context(tokenizer, enable_thinking)
        return tokenize_segments(tokenizer, turns, head=self._head(self._system_text(conversation), ctx))

    def render(self, conversation: Conversation, tokenizer=None, enable_thinking: bool = True) -> TextTurns:
        """(prompt_text, response_text) per answer. A conversation that ends on the prompt side
        gets a last turn (prompt + generation header, "")."""
        ctx = self._context(tokenizer, enable_thinking)
        msgs = conversation.messages
        ctx.last_query = _last_query_index(msgs)
        system = self._system_text(conversation)
        prompt = self._head(system, ctx)
        turns: TextTurns = []
        first_user, i = True, 0
        while i < len(msgs):
            msg = msgs[i]
            if msg.role == Role.USER:
                content = msg.content
                if self.image_text is not None:
                    content = content.replace("<image>", self.image_text)
                if first_user and system and self.system_in_user:
                    content = self._fill(self.system, ctx, system) + content
                prompt += self._fill(self.user, ctx, content)
                first_user = False
                i += 1
            elif msg.role == Role.TOOL:
                j = i
                while j < len(msgs) and msgs[j].role == Role.TOOL:
                    j += 1
                prompt += self._tool_results([m.content for m in msgs[i:j]], ctx)
                i = j
            elif msg.role in ANSWER_ROLES:
                ctx.index, ctx.is_last = i, i == len(msgs) - 1
                extra_prompt, response = self._answer(msg, ctx)
                turns.append((prompt + self._fill(self.header, ctx) + extra_prompt, response))
                prompt = ""
                i += 1
            else:
                raise ValueError(f"unknown role {msg.role!r} in {conversation.source or 'conversation'}")
        if prompt or not turns:
            turns.append((prompt + self._generation_prompt(ctx), ""))
        return turns

    @staticmethod
    def _context(tokenizer, enable_thinking: bool) -> SimpleNamespace:
        return SimpleNamespace(
            bos=(getattr(tokenizer, "bos_token", None) or ""),
            eos=(getattr(tokenizer, "eos_token", None) or ""),
            enable_thinking=enable_thinking,
        )

    def _head(self, system: str, ctx) -> str:
        """What opens the first prompt before the first user message: the prefix and the
        system block (empty when the system text goes into the first user turn)."""
        head = self._fill(self.prefix, ctx)
        if system and not self.system_in_user:
            head += self._fill(self.system, ctx, system)
        return head

    # -- pieces subclasses override -----------------------------------------------------------

    def _system_text(self, conv: Conversation) -> str:
        system = conv.system or self.default_system
        tools = parse_tools(conv.tools)
        if tools:
            tool_text = format_tools(self.tool_style, tools)
            system = f"{system}\n\n{tool_text}" if system else tool_text
        return system

    def _tool_results(self, contents: list[str], ctx) -> str:
        fmt = self.observation if self.observation is not None else self.user
        return "".join(self._fill(fmt, ctx, c) for c in contents)

    def _answer(self, msg: Message, ctx) -> tuple[str, str]:
        """(text appended to the prompt after the header, response text)."""
        if msg.role == Role.FUNCTION:
            fmt = self.function if self.function is not None else self.assistant
            return "", self._fill(fmt, ctx, format_calls(self.tool_style, parse_calls(msg.content)))
        return "", self._fill(self.assistant, ctx, msg.content)

    def _generation_prompt(self, ctx) -> str:
        return self._fill(self.header, ctx)

    @staticmethod
    def _fill(fmt: str, ctx, content: str = "") -> str:
        # str.replace, not str.format: contents are full of braces.
        return fmt.replace("{bos}", ctx.bos).replace("{eos}", ctx.eos).replace("{content}", content)


@dataclass
class QwenTemplate(Template):
    """ChatML as Qwen2.5 renders it: tools in the system prompt, tool calls in <tool_call> tags,
    consecutive tool results merged into one user turn of <tool_response> blocks."""

    def _tool_results(self, contents: list[str], ctx) -> str:
        body = "".join(f"\n<tool_response>\n{c}\n</tool_response>" for c in contents)
        return f"<|im_start|>user{body}<|im_end|>\n"


@dataclass
class Qwen3Template(QwenTemplate):
    """Qwen3 (hybrid thinking): answers after the last user query show a <think> block (empty if
    the data has none) on the final answer or when they carry reasoning; earlier answers lose
    their reasoning, as in Qwen3's own template. With enable_thinking=False all reasoning is
    dropped and the final answer's empty <think> block goes to the prompt (no loss on it)."""

    def _answer(self, msg: Message, ctx) -> tuple[str, str]:
        reasoning, body = split_thought(msg.content)
        if msg.role == Role.FUNCTION:
            body = format_calls(self.tool_style, parse_calls(body))
        if not ctx.enable_thinking:
            reasoning = ""
        show_think = ctx.index > ctx.last_query and (ctx.is_last or reasoning)
        response = body + "<|im_end|>\n"
        if not show_think:
            return "", response
        think = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"
        response = body.lstrip("\n") + "<|im_end|>\n"
        if ctx.enable_thinking or reasoning:
            return "", think + response
        return think, response

    def _generation_prompt(self, ctx) -> str:
        return self.header + ("" if ctx.enable_thinking else "<think>\n\n</think>\n\n")


def _last_query_index(msgs: list[Message]) -> int:
    """Index of the last real user query (Qwen3's `last_query_index`)."""
    for i in range(len(msgs) - 1, -1, -1):
        c = msgs[i].content
        if msgs[i].role == Role.USER and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            return i
    return len(msgs) - 1


# ---------------------------------------------------------------------------------------------
# auto: the tokenizer's own chat template
# ---------------------------------------------------------------------------------------------


def to_chat_messages(conversation: Conversation) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) in the form `tokenizer.apply_chat_template` takes. "<image>" placeholders
    become {"type": "image"} content parts."""
    out = []
    if conversation.system:
        out.append({"role": "system", "content": conversation.system})
    for m in conversation.messages:
        if m.role == Role.FUNCTION:
            calls = [{"type": "function", "function": c} for c in parse_calls(m.content)]
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif m.role == Role.USER and "<image>" in m.content:
            parts = []
            for k, text in enumerate(m.content.split("<image>")):
                if k:
                    parts.append({"type": "image"})
                if text:
                    parts.append({"type": "text", "text": text})
            out.append({"role": "user", "content": parts})
        else:
            out.append({"role": m.role.value, "content": m.content})
    return out, (parse_tools(conversation.tools) or None)


@dataclass
class AutoTemplate(Template):
    """Renders with `tokenizer.chat_template`; an answer's prompt ends where the conversation
    before it, rendered with the generation prompt, stops matching the full rendering."""

    def encode(self, tokenizer, conversation: Conversation, enable_thinking: bool = True) -> TokenTurns:
        """(prompt_ids, response_ids) per answer: the tokens of the chat template's full
        rendering, cut at the turn boundaries (`tokenize_turns`)."""
        return tokenize_turns(tokenizer, self.render(conversation, tokenizer, enable_thinking))

    def render(self, conversation: Conversation, tokenizer=None, enable_thinking: bool = True) -> TextTurns:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'auto' needs a tokenizer with a chat_template")
        messages, tools = to_chat_messages(conversation)

        def text(msgs, gen):
            return tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen,
                                                 enable_thinking=enable_thinking)

        full = text(messages, False)
        token_starts = _token_starts(tokenizer, full)

        def snap(pos):  # a mismatch inside a token ("<think>" vs "<tool_call>") -> its start
            return token_starts[bisect.bisect_right(token_starts, pos) - 1] if token_starts else pos

        answers = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        bounds, prev_end = [], 0
        for k in answers:
            start = 0
            if k:
                prompt = text(messages[:k], True)
                start = len(prompt) if full.startswith(prompt) else snap(_common_prefix(prompt, full))
            rendered = text(messages[: k + 1], False)
            if full.startswith(rendered):
                end = len(rendered)
            else:  # e.g. Qwen3 adds/strips a <think> block on the last message: align the tail
                d = _common_prefix(rendered, full)
                tail = rendered[d:]
                n = next(n for n in range(len(tail), -1, -1) if full.startswith(tail[len(tail) - n:], d))
                end = d + n
            if not prev_end <= start <= end <= len(full):
                raise ValueError(f"template 'auto': cannot split the chat template's output into turns "
                                 f"(answer {k}: {prev_end=} {start=} {end=}) for {conversation.source!r}")
            bounds.append((start, end))
            prev_end = end
        turns, pos = [], 0
        for start, end in bounds:
            turns.append((full[pos:start], full[start:end]))
            pos = end
        if not turns:
            return [(text(messages, True), "")]
        if pos < len(full):  # text after the last answer (e.g. a closing eos) stays with it
            turns[-1] = (turns[-1][0], turns[-1][1] + full[pos:])
        return turns


def _token_starts(tokenizer, text: str) -> list[int]:
    if not getattr(tokenizer, "is_fast", False):
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return sorted({0, *(start for start, _ in enc["offset_mapping"])})


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------


def tokenize_segments(tokenizer, turns: TextTurns, head: str = "") -> TokenTurns:
    """Text turns [(prompt, response), ...] -> token turns, tokenizing every prompt and every
    response on its own (no special tokens added), as LLaMA-Factory encodes each message on its
    own; `head`, when the first prompt starts with it (a named template's prefix + system
    block), is tokenized apart from the rest of that prompt, as LLaMA-Factory encodes the
    system slot apart from the first user message. So no token spans a prompt and an answer:
    every answer character is in the answer's tokens."""
    segments = [s for turn in turns for s in turn]
    pieces = list(segments)
    if head and segments and segments[0].startswith(head) and len(segments[0]) > len(head):
        pieces[0:1] = [head, segments[0][len(head):]]
    present = [p for p in pieces if p]
    encoded = iter(tokenizer(present, add_special_tokens=False)["input_ids"] if present else [])
    ids = [list(next(encoded)) if p else [] for p in pieces]
    if len(pieces) > len(segments):
        ids[0:2] = [ids[0] + ids[1]]
    return [(ids[2 * t], ids[2 * t + 1]) for t in range(len(turns))]


def tokenize_turns(tokenizer, turns: TextTurns) -> TokenTurns:
    """Text turns [(prompt, response), ...] -> token turns, keeping the tokens of the full text.

    The concatenated text is tokenized once (no special tokens added) and the ids are cut at
    the turn boundaries, so the ids are exactly those of the full rendering (what the model's
    chat template gives; used by `auto`). A token that crosses a boundary (a prompt ending in
    spaces, an answer starting with a newline after a header ending in one) would put the
    start of an answer into the prompt, never to be learned; then, and for slow tokenizers
    (no offsets), each segment is tokenized on its own (`tokenize_segments`).
    """
    segments = [s for turn in turns for s in turn]
    if not getattr(tokenizer, "is_fast", False):
        return tokenize_segments(tokenizer, turns)
    enc = tokenizer("".join(segments), add_special_tokens=False, return_offsets_mapping=True)
    ends, pos = [], 0
    for s in segments:
        pos += len(s)
        ends.append(pos)
    parts: list[list[int]] = [[] for _ in segments]
    for tid, (start, stop) in zip(enc["input_ids"], enc["offset_mapping"]):
        k = min(bisect.bisect_right(ends, start), len(parts) - 1)  # the segment the token starts in
        if stop > ends[k]:  # it runs into the next segment
            return tokenize_segments(tokenizer, turns)
        parts[k].append(tid)
    return [(parts[2 * t], parts[2 * t + 1]) for t in range(len(turns))]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n"
_CHATML_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"
_CHATML_HEADER = "<|im_start|>assistant\n"
_CHATML_ANSWER = "{content}<|im_end|>\n"


def _qwen(name: str, cls=QwenTemplate, **kw) -> Template:
    return cls(name=name, user=_CHATML_USER, system=_CHATML_SYSTEM, header=_CHATML_HEADER, assistant=_CHATML_ANSWER,
               tool_style="qwen", stop_words=["<|im_end|>"], replace_eos=True, **kw)


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        AutoTemplate(name="auto"),
        Template(name="empty", assistant="{content}"),
        Template(name="default", user="Human: {content}{eos}\n", header="Assistant:",
                 assistant="{content}{eos}\n", system="System: {content}{eos}\n"),
        Template(name="alpaca", user="### Instruction:\n{content}\n\n", header="### Response:\n",
                 assistant="{content}{eos}\n\n",
                 default_system="Below is an instruction that describes a task. "
                                "Write a response that appropriately completes the request.\n\n"),
        Template(name="chatml", user=_CHATML_USER, system=_CHATML_SYSTEM, header=_CHATML_HEADER,
                 assistant=_CHATML_ANSWER, observation="<|im_start|>tool\n{content}<|im_end|>\n",
                 stop_words=["<|im_end|>", "<|im_start|>"], replace_eos=True),
        _qwen("qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
        _qwen("qwen2_vl", default_system="You are a helpful assistant.",
              image_text="<|vision_start|><|image_pad|><|vision_end|>", image_token="<|image_pad|>"),
        _qwen("qwen3", cls=Qwen3Template),
        _qwen("qwen3_nothink"),
        Template(name="llama3", prefix="{bos}",
                 user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
                 system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                 observation="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
                 header="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>",
                 tool_style="llama3", stop_words=["<|eot_id|>", "<|eom_id|>"], replace_eos=True),
        Template(name="mistral", prefix="{bos}", user="[INST] {content}[/INST]", assistant=" {content}{eos}",
                 system="{content}\n\n", system_in_user=True, tool_style="mistral",
                 function="{content}{eos}",
                 observation='[TOOL_RESULTS] {"content": {content}}[/TOOL_RESULTS]'),
    ]
}


def apply_template_eos(tokenizer, template: Template) -> str | None:
    """LLaMA-Factory's `replace_eos`: the tokenizer's eos becomes the template's first stop word
    (e.g. a base Qwen tokenizer, eos <|endoftext|>, trained with `qwen3` stops at <|im_end|>),
    so training data and the exported tokenizer agree on where an answer ends. Returns a note
    when it changed something. The stop word must already be a token: the vocabulary is never
    resized."""
    if not (template.replace_eos and template.stop_words) or tokenizer.eos_token == template.stop_words[0]:
        return None
    word = template.stop_words[0]
    ids = tokenizer.convert_tokens_to_ids([word])
    if ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(
            f"template '{template.name}' ends answers with {word!r}, which is not a token of this "
            "tokenizer; choose the template that matches the model"
        )
    old = tokenizer.eos_token
    tokenizer.eos_token = word
    return f"template '{template.name}': eos token {old!r} -> {word!r} (as LLaMA-Factory's replace_eos)"


def get_template(name: str) -> Template:
    """The named template; ValueError listing the names for an unknown one."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; available: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
