"""Named templates vs. the real chat templates (token for token), `auto`, and the tiny tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatune.data.conversation import Conversation, Message, Role
from megatune.data.templates import TEMPLATES, get_template, to_chat_messages
from megatune.tiny_tokenizer import make_tiny_tokenizer

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "chat_templates"

U, A, F, T = Role.USER, Role.ASSISTANT, Role.FUNCTION, Role.TOOL

WEATHER = {
    "name": "get_weather",
    "description": "Get the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {"name": "get_time", "description": "Current time in a city", "parameters": {"type": "object", "properties": {}}}
HF_TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]


def _call(name, **args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


# name -> (Conversation, the same chat as apply_chat_template messages, tools)
CASES = {
    "single": (
        Conversation([Message(U, "Hello, who are you?"), Message(A, "I am a tiny model.")]),
        [{"role": "user", "content": "Hello, who are you?"}, {"role": "assistant", "content": "I am a tiny model."}],
        None,
    ),
    "multi": (
        Conversation([Message(U, "Hi!"), Message(A, "Hello! How can I help?"),
                      Message(U, "What is 2 + 3?"), Message(A, "2 + 3 = 5.")]),
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
        None,
    ),
    "system": (
        Conversation([Message(U, "Who are you?"), Message(A, "Arr, a pirate.")], system="You are a pirate."),
        [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Who are you?"},
         {"role": "assistant", "content": "Arr, a pirate."}],
        None,
    ),
    "tools": (
        Conversation(
            [Message(U, "Weather in Paris?"),
             Message(F, json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}}])),
             Message(T, '{"temperature": 22}'),
             Message(A, "It is 22 degrees in Paris.")],
            tools=json.dumps([WEATHER, TIME]),
        ),
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", city="Paris")]},
         {"role": "tool", "content": '{"temperature": 22}'},
         {"role": "assistant", "content": "It is 22 degrees in Paris."}],
        HF_TOOLS,
    ),
    "parallel_tools_system": (  # two calls in one turn, two results, string arguments, a system prompt
        Conversation(
            [Message(U, "Weather and time in Rome?"),
             Message(F, json.dumps([{"name": "get_weather", "arguments": '{"city": "Rome"}'},
                                    {"name": "get_time", "arguments": {}}])),
             Message(T, "sunny"), Message(T, "12:00"),
             Message(A, "Sunny, and it is noon."),
             Message(U, "Thanks!"), Message(A, "You are welcome.")],
            system="Be brief.",
            tools=json.dumps([{"type": "function", "function": WEATHER}, TIME]),
        ),
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Weather and time in Rome?"},
         {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", city="Rome"), _call("get_time")]},
         {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "12:00"},
         {"role": "assistant", "content": "Sunny, and it is noon."},
         {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}],
        HF_TOOLS,
    ),
    "reasoning": (  # Qwen3 strips reasoning from history answers and keeps it on the last one
        Conversation([Message(U, "2 + 3?"), Message(A, "<think>\nAdd them.\n</think>\n\n5"),
                      Message(U, "Times 4?"), Message(A, "<think>\n5 * 4 = 20\n</think>\n\n20")]),
        [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n5"},
         {"role": "user", "content": "Times 4?"},
         {"role": "assistant", "content": "<think>\n5 * 4 = 20\n</think>\n\n20"}],
        None,
    ),
    "image": (
        Conversation([Message(U, "<image>What is in the picture?"), Message(A, "A cat.")], images=["cat.png"]),
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
         {"role": "assistant", "content": "A cat."}],
        None,
    ),
}

TEXT = ["single", "multi", "system"]
TOOLS = TEXT + ["tools", "parallel_tools_system"]
# (fixture, our template, enable_thinking, cases proven equal)
MATRIX = [
    ("qwen2_5", "qwen", True, TOOLS),
    ("qwen3", "qwen3", True, TOOLS + ["reasoning"]),
    ("qwen3", "qwen3", False, TOOLS),
    ("qwen3_instruct_2507", "qwen3_nothink", True, TOOLS),
    ("qwen2_5_vl", "qwen2_vl", True, TEXT + ["image"]),
    ("llama3", "llama3", True, TEXT),
]
PARAMS = [pytest.param(fx, tpl, think, case, id=f"{fx}-{tpl}-{'think' if think else 'nothink'}-{case}")
          for fx, tpl, think, cases in MATRIX for case in cases]


def _family(fixture):
    return "llama3" if fixture.startswith("llama3") else "qwen"


_TOKENIZERS = {}


def tokenizer_for(fixture):
    path = FIXTURES / f"{fixture}.jinja"
    if not path.exists():
        pytest.skip(f"chat template fixture {path} not available")
    if fixture not in _TOKENIZERS:
        _TOKENIZERS[fixture] = make_tiny_tokenizer(chat_template=path.read_text(), family=_family(fixture))
    return _TOKENIZERS[fixture]


def reference_ids(tok, messages, tools, enable_thinking):
    out = tok.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=False,
                                  enable_thinking=enable_thinking)
    return list(out if isinstance(out, list) else out["input_ids"])


def flat(turns):
    return [i for p, r in turns for i in p + r]


@pytest.mark.parametrize("fixture,template,think,case", PARAMS)
def test_named_template_equals_real_chat_template(fixture, template, think, case):
    tok = tokenizer_for(fixture)
    conv, messages, tools = CASES[case]
    turns = get_template(template).encode(tok, conv, enable_thinking=think)
    expected = reference_ids(tok, messages, tools, think)
    assert flat(turns) == expected, (tok.decode(flat(turns)), tok.decode(expected))
    assert len(turns) == sum(m.role in (A, F) for m in conv.messages)


@pytest.mark.parametrize("fixture,template,think,case", PARAMS)
def test_auto_equals_real_chat_template_and_named_split(fixture, template, think, case):
    tok = tokenizer_for(fixture)
    conv, messages, tools = CASES[case]
    auto = get_template("auto").encode(tok, conv, enable_thinking=think)
    assert flat(auto) == reference_ids(tok, messages, tools, think)
    # same prompt/response split as the named template
    assert auto == get_template(template).encode(tok, conv, enable_thinking=think)


def test_to_chat_messages_matches_hand_written():
    for case, (conv, messages, tools) in CASES.items():
        msgs, tls = to_chat_messages(conv)
        assert msgs == messages, case
        assert tls == tools, case


def _eot(template):
    return "<|eot_id|>" if template == "llama3" else "<|im_end|>\n"


@pytest.mark.parametrize("fixture,template", [("qwen2_5", "qwen"), ("qwen3_instruct_2507", "qwen3_nothink"),
                                              ("llama3", "llama3"), ("qwen2_5_vl", "qwen2_vl")])
def test_responses_are_answer_plus_end_of_turn(fixture, template):
    tok = tokenizer_for(fixture)
    conv, _, _ = CASES["multi"]
    turns = get_template(template).encode(tok, conv)
    answers = [m.content for m in conv.messages if m.role == A]
    assert [tok.decode(r) for _, r in turns] == [a + _eot(template) for a in answers]
    if template != "llama3":
        conv, _, _ = CASES["tools"]
        turns = get_template(template).encode(tok, conv)
        assert [tok.decode(r) for _, r in turns] == [
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
            "It is 22 degrees in Paris.<|im_end|>\n",
        ]
        assert tok.decode(turns[1][0]) == (
            "<|im_start|>user\n<tool_response>\n{\"temperature\": 22}\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n")


def test_qwen3_thinking_split():
    tok = tokenizer_for("qwen3")
    conv, _, _ = CASES["multi"]
    qwen3 = get_template("qwen3")
    # thinking on: the empty think block of the final answer is learned
    (p0, r0), (p1, r1) = qwen3.encode(tok, conv, enable_thinking=True)
    assert tok.decode(r0) == "Hello! How can I help?<|im_end|>\n"  # history answer: no think block
    assert tok.decode(p1).endswith("<|im_start|>assistant\n")
    assert tok.decode(r1) == "<think>\n\n</think>\n\n2 + 3 = 5.<|im_end|>\n"
    # thinking off: it is part of the prompt, like the generation prompt with enable_thinking=False
    (_, _), (p1, r1) = qwen3.encode(tok, conv, enable_thinking=False)
    assert tok.decode(p1).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(r1) == "2 + 3 = 5.<|im_end|>\n"
    # real reasoning of the final answer is learned; with thinking off it is dropped
    conv, messages, _ = CASES["reasoning"]
    assert tok.decode(qwen3.encode(tok, conv)[1][1]) == "<think>\n5 * 4 = 20\n</think>\n\n20<|im_end|>\n"
    off = qwen3.encode(tok, conv, enable_thinking=False)
    stripped = [dict(m, content=m["content"].split("</think>")[-1].lstrip("\n")) for m in messages]
    assert flat(off) == reference_ids(tok, stripped, None, False)
    assert tok.decode(off[1][1]) == "20<|im_end|>\n"
    # a conversation ending on the prompt side gets the generation prompt
    gen = qwen3.encode(tok, Conversation([Message(U, "Hi")]), enable_thinking=False)
    out = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, add_generation_prompt=True,
                                  enable_thinking=False)
    assert flat(gen) == list(out if isinstance(out, list) else out["input_ids"])


def test_llama3_bos_and_no_default_system():
    tok = tokenizer_for("llama3")
    conv, _, _ = CASES["single"]
    (prompt, _), = get_template("llama3").encode(tok, conv)
    assert prompt[0] == tok.bos_token_id
    assert tok.decode(prompt) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello, who are you?"
                                  "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_qwen_default_systems():
    conv = CASES["single"][0]
    assert get_template("qwen").render(conv)[0][0].startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")
    assert get_template("qwen2_vl").render(conv)[0][0].startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    for name in ("qwen3", "qwen3_nothink"):
        assert get_template(name).render(conv)[0][0] == (
            "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n")


def test_plain_templates_render():
    tok = make_tiny_tokenizer(family="qwen")  # base: eos <|endoftext|>
    conv = CASES["system"][0]
    expect = {
        "empty": [("You are a pirate.Who are you?", "Arr, a pirate.")],
        "default": [("System: You are a pirate.<|endoftext|>\nHuman: Who are you?<|endoftext|>\nAssistant:",
                     "Arr, a pirate.<|endoftext|>\n")],
        "alpaca": [("You are a pirate.### Instruction:\nWho are you?\n\n### Response:\n",
                    "Arr, a pirate.<|endoftext|>\n\n")],
        "chatml": [("<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n"
                    "<|im_start|>assistant\n", "Arr, a pirate.<|im_end|>\n")],
        "mistral": [("[INST] You are a pirate.\n\nWho are you?[/INST]", " Arr, a pirate.<|endoftext|>")],
    }
    for name, turns in expect.items():
        template = get_template(name)
        assert template.render(conv, tok) == turns, name
        ids = template.encode(tok, conv)
        assert flat(ids) == tok("".join(s for t in turns for s in t), add_special_tokens=False)["input_ids"]
    alpaca = get_template("alpaca").render(CASES["single"][0], tok)
    assert alpaca[0][0].startswith("Below is an instruction that describes a task.")


def test_tool_styles_render():
    conv = CASES["tools"][0]
    mistral = get_template("mistral").render(conv)
    assert mistral[0][0].startswith('[INST] [AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather"')
    assert mistral[0][1] == '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    assert mistral[1][0] == '[TOOL_RESULTS] {"content": {"temperature": 22}}[/TOOL_RESULTS]'
    llama3 = get_template("llama3").render(conv)
    assert llama3[0][1] == '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n{\"temperature\": 22}<|eot_id|>" in llama3[1][0]
    default = get_template("default").render(conv)
    assert "Action: tool name (one of [get_weather, get_time])" in default[0][0]
    assert default[0][1] == 'Action: get_weather\nAction Input: {"city": "Paris"}\n\n'


def test_unknown_template():
    with pytest.raises(ValueError, match="available: .*qwen3_nothink"):
        get_template("nope")
    assert {"default", "empty", "alpaca", "chatml", "qwen", "qwen3", "qwen3_nothink", "qwen2_vl", "llama3",
            "mistral", "auto"} <= set(TEMPLATES)


def test_auto_needs_chat_template():
    with pytest.raises(ValueError, match="chat_template"):
        get_template("auto").encode(make_tiny_tokenizer(), CASES["single"][0])


def test_tiny_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    for family, bos, eos in [("qwen", None, "<|im_end|>"), ("llama3", "<|begin_of_text|>", "<|eot_id|>")]:
        tok = make_tiny_tokenizer(tmp_path / family, chat_template="{{ bos_token }}", family=family)
        assert len(tok) <= 512 and max(tok.get_vocab().values()) < 512
        assert (tok.bos_token, tok.eos_token) == (bos, eos)
        loaded = AutoTokenizer.from_pretrained(tmp_path / family)
        text = "<|im_start|>Hello, world! 123<|eot_id|>"
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    base = make_tiny_tokenizer()
    assert (base.eos_token, base.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    llama3 = make_tiny_tokenizer(family="llama3")
    assert llama3("hi")["input_ids"][0] == llama3.bos_token_id
    with pytest.raises(ValueError):
        make_tiny_tokenizer(family="gpt2")


def test_tiny_tokenizer_is_deterministic_across_processes():
    code = ("from megatune.tiny_tokenizer import make_tiny_tokenizer as m;"
            "print(m().backend_tokenizer.to_str())")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1] == make_tiny_tokenizer().backend_tokenizer.to_str() + "\n"
