"""A tiny byte-level BPE tokenizer built offline, with the special tokens of a model family.

Used by the tests and the quick start together with `tiny.make_tiny_model` (vocab_size 512):
no hub access, deterministic, every token id < 512.
"""

from __future__ import annotations

VOCAB_SIZE = 512

# Qwen2's pre-tokenizer split (Llama 3 differs only in grouping up to 3 digits).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = _QWEN_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

FAMILIES = {
    "qwen": dict(
        special=[
            "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
            "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
            "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
        ],
        split=_QWEN_SPLIT,
        base=dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
        chat=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    ),
    "llama3": dict(
        special=[
            "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|eom_id|>", "<|python_tag|>",
        ],
        split=_LLAMA3_SPLIT,
        base=dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|end_of_text|>"),
        chat=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>"),
    ),
}

# Small built-in training text: plain English plus the shapes chat data has (JSON, code, lists).
_CORPUS = """\
You are a helpful assistant. The user asks a question and the assistant answers it.
Hello! How are you today? I am fine, thank you. What can I do for you?
Please write a short poem about the sea. The sea is wide and blue, the waves are white.
What is the capital of France? The capital of France is Paris.
Translate the following sentence into English. Summarize the text below in one sentence.
Below is an instruction that describes a task. Write a response that appropriately completes the request.
### Instruction:
### Response:
System: Human: Assistant: user assistant system tool function ipython
The quick brown fox jumps over the lazy dog. A model learns from data, one token at a time.
Training a language model needs a tokenizer, a dataset, an optimizer and a lot of patience.
Let me think step by step. First, we add two and three, which gives five. Then we multiply by four.
The answer is 20. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14
{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "search", "description": "Search the web",
 "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
def add(a, b):
    return a + b
# Tools
You may call one or more functions to assist with the user query.
For each function call, return a json object with function name and arguments.
The weather in Paris is sunny and warm, with a temperature of 22 degrees.
"""


def make_tiny_tokenizer(out_dir=None, chat_template: str | None = None, family: str = "qwen"):
    """Train a byte-level BPE (vocab <= 512 incl. special tokens) for `family` ("qwen" or
    "llama3"). With a `chat_template` the chat eos is used (<|im_end|> / <|eot_id|>), without
    one the base eos (<|endoftext|> / <|end_of_text|>). Saved to `out_dir` when given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; available: {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    special = spec["special"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["split"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    if family == "llama3":  # like the real one: encode() with special tokens prepends bos
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )

    roles = spec["chat" if chat_template is not None else "base"]
    named = set(roles.values())
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        extra_special_tokens=[t for t in special if t not in named],
        clean_up_tokenization_spaces=False,
        **roles,
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    assert len(hf) <= VOCAB_SIZE, len(hf)
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf
