"""Dataset registry and format converters: our demo data, LLaMA-Factory's demo data, and every error."""

import json
from pathlib import Path

import pytest

from megatune.data.conversation import Role
from megatune.data.converters import convert_rows, to_conversation
from megatune.data.registry import (
    DataError,
    load_dataset_info,
    load_rows,
    mix_datasets,
    resolve_datasets,
    split_validation,
)

REPO = Path(__file__).resolve().parents[1]
OUR_DATA = REPO / "data"
LF_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "lf_data"
needs_lf = pytest.mark.skipif(not LF_DATA.is_dir(), reason="LLaMA-Factory demo data (../shared) not present")


def load(name, dataset_dir, stage="sft", skip_invalid=False):
    (spec,) = resolve_datasets(name, dataset_dir)
    rows = load_rows(spec, dataset_dir)
    convs, skipped = convert_rows(rows, spec, skip_invalid=skip_invalid, stage=stage)
    return spec, rows, convs, skipped


def write_info(tmp_path, entries, files=None):
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries))
    for name, content in (files or {}).items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return tmp_path


def alternates(messages):
    return all(
        m.role in ((Role.USER, Role.TOOL) if i % 2 == 0 else (Role.ASSISTANT, Role.FUNCTION))
        for i, m in enumerate(messages)
    )


# --- our demo data -------------------------------------------------------------------------


def test_our_demo_data():
    info = load_dataset_info(OUR_DATA)
    assert set(info) >= {"megatune_identity", "megatune_chat"}
    _, rows, convs, skipped = load("megatune_identity", OUR_DATA)
    assert skipped == 0 and len(convs) == len(rows) >= 25
    assert all(len(c.messages) == 2 and c.messages[0].role == Role.USER for c in convs)
    assert any("Megatune" in c.messages[1].content for c in convs)
    _, rows, convs, skipped = load("megatune_chat", OUR_DATA)
    assert skipped == 0 and len(convs) >= 8
    assert all(len(c.messages) >= 4 and alternates(c.messages) for c in convs)
    assert any(c.system for c in convs)  # a leading system message moves to `system`
    assert sum(p.stat().st_size for p in OUR_DATA.rglob("*") if p.is_file()) < 60_000  # text, pairs, 12 tiny PNGs


# --- LLaMA-Factory's demo data ---------------------------------------------------------------


@needs_lf
def test_lf_alpaca_and_identity():
    _, rows, convs, _ = load("alpaca_en_demo", LF_DATA)
    assert len(convs) == len(rows) > 0
    row = next(r for r in rows if r["input"])
    conv = to_conversation(row, resolve_datasets("alpaca_en_demo", LF_DATA)[0], "x")
    assert conv.messages[0].content == row["instruction"] + "\n" + row["input"]
    assert conv.messages[1].content == row["output"]
    _, _, convs, _ = load("identity", LF_DATA)
    assert convs[0].messages[0].content == "hi"


@needs_lf
def test_lf_sharegpt_tools():
    _, rows, convs, _ = load("glaive_toolcall_en_demo", LF_DATA)
    assert len(convs) == len(rows)
    with_calls = [c for c in convs if any(m.role == Role.FUNCTION for m in c.messages)]
    assert with_calls
    conv = with_calls[0]
    assert conv.tools and isinstance(json.loads(conv.tools), list)
    i = next(i for i, m in enumerate(conv.messages) if m.role == Role.FUNCTION)
    calls = json.loads(conv.messages[i].content)
    assert isinstance(calls, list) and "name" in calls[0] and "arguments" in calls[0]
    assert conv.messages[i + 1].role == Role.TOOL
    assert all(alternates(c.messages) for c in convs)


@needs_lf
def test_lf_mllm_images():
    _, rows, convs, _ = load("mllm_demo", LF_DATA)
    assert len(convs) == len(rows)
    assert convs[0].images and all(p.endswith(".jpg") for p in convs[0].images)
    assert all(Path(p).is_file() for c in convs for p in c.images)
    assert "<image>" in convs[0].messages[0].content


@needs_lf
@pytest.mark.parametrize("name", ["c4_demo", "wiki_demo"])
def test_lf_pretrain_text(name):
    _, rows, convs, skipped = load(name, LF_DATA, stage="pt")
    assert skipped == 0 and len(convs) == len(rows) > 0
    assert all(len(c.messages) == 1 and c.messages[0].role == Role.ASSISTANT for c in convs)
    assert convs[0].messages[0].content == rows[0]["text"]


@needs_lf
def test_lf_info_parses_and_hub_entries_refused():
    info = load_dataset_info(LF_DATA)
    assert info["glaive_toolcall_en_demo"].formatting == "sharegpt"
    with pytest.raises(DataError, match="local files only"):
        load_rows(info["alpaca_en"], LF_DATA)


# --- other formats ---------------------------------------------------------------------------


def test_alpaca_history_system_tools(tmp_path):
    row = {
        "q": "And 3+3?",
        "a": "6",
        "hist": [["1+1?", "2"], ["2+2?", "4"]],
        "sys": "Be brief.",
        "fns": [{"name": "add", "parameters": {}}],
    }
    cols = {"prompt": "q", "response": "a", "history": "hist", "system": "sys", "tools": "fns"}
    write_info(tmp_path, {"d": {"file_name": "d.jsonl", "columns": cols}}, {"d.jsonl": json.dumps(row) + "\n"})
    _, _, (conv,), _ = load("d", tmp_path)
    assert [m.content for m in conv.messages] == ["1+1?", "2", "2+2?", "4", "And 3+3?", "6"]
    assert conv.system == "Be brief." and json.loads(conv.tools)[0]["name"] == "add"


def test_openai_format(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
                ]},
                {"role": "tool", "content": "rain"},
                {"role": "assistant", "content": "It rains."},
            ]
        }
    ]
    write_info(tmp_path, {"o": {"file_name": "o.json", "formatting": "openai"}}, {"o.json": rows})
    _, _, (conv,), _ = load("o", tmp_path)
    assert conv.system == "sys"
    assert [m.role for m in conv.messages] == [Role.USER, Role.FUNCTION, Role.TOOL, Role.ASSISTANT]
    assert json.loads(conv.messages[1].content) == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]


def test_folder_csv_and_parquet(tmp_path):
    import datasets

    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.csv").write_text("instruction,input,output\nhi,,hello\n2+2,,4\n")
    (folder / "b.csv").write_text("instruction,input,output\nbye,,goodbye\n")
    datasets.Dataset.from_list([{"instruction": "p", "input": "", "output": "r"}]).to_parquet(tmp_path / "p.parquet")
    write_info(tmp_path, {"f": {"file_name": "parts"}, "p": {"file_name": "p.parquet"}})
    _, _, convs, _ = load("f", tmp_path)
    assert [c.messages[1].content for c in convs] == ["hello", "4", "goodbye"]
    _, _, convs, _ = load("p", tmp_path)
    assert convs[0].messages[1].content == "r"


# --- errors ----------------------------------------------------------------------------------


def test_missing_dataset_info(tmp_path):
    with pytest.raises(DataError, match=r"looked for .*dataset_info\.json"):
        load_dataset_info(tmp_path)


def test_invalid_dataset_info(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{\n  "a": {"file_name": "a.json"},\n  "b": \n}\n')
    with pytest.raises(DataError, match=r"dataset_info\.json: invalid JSON at line 4"):
        load_dataset_info(tmp_path)
    write_info(tmp_path, {"a": {"file_name": "a.json", "colums": {}}})
    with pytest.raises(DataError, match="unknown key.*colums"):
        load_dataset_info(tmp_path)


def test_unknown_dataset_lists_available():
    with pytest.raises(DataError, match="available: .*megatune_chat, megatune_identity"):
        resolve_datasets("megatune_identity,nope", OUR_DATA)


def test_unparsable_json_names_file_and_line(tmp_path):
    bad = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": }\n]\n'
    write_info(tmp_path, {"d": {"file_name": "bad.json"}}, {"bad.json": bad})
    with pytest.raises(DataError, match=r"dataset 'd', file .*bad\.json: invalid JSON at line 3"):
        load("d", tmp_path)


def test_bad_jsonl_line_names_line(tmp_path):
    good = json.dumps({"instruction": "a", "output": "b"})
    content = "\n".join([good, "", good, "{not json}", good]) + "\n"
    write_info(tmp_path, {"d": {"file_name": "bad.jsonl"}}, {"bad.jsonl": content})
    with pytest.raises(DataError, match=r"bad\.jsonl, row 2 \(line 4\): invalid JSON"):
        load("d", tmp_path)


def test_missing_column(tmp_path):
    write_info(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": [{"question": "a", "output": "b"}]})
    with pytest.raises(DataError, match=r"missing column 'instruction'.*found columns \['output', 'question'\]"):
        load("d", tmp_path)
    write_info(
        tmp_path,
        {"d": {"file_name": "d.json", "columns": {"system": "sys"}}},
        {"d.json": [{"instruction": "a", "output": "b"}]},
    )
    with pytest.raises(DataError, match=r"row 0: missing column 'sys'"):
        load("d", tmp_path)


def sharegpt_file(tmp_path, conv):
    info = {"d": {"file_name": "d.json", "formatting": "sharegpt"}}
    write_info(tmp_path, info, {"d.json": [{"conversations": conv}]})


def test_wrong_role_order(tmp_path):
    conv = [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]
    sharegpt_file(tmp_path, conv)
    with pytest.raises(DataError, match=r"row 0: message 1 has role 'human' where a answer-side"):
        load("d", tmp_path)
    conv = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}]
    sharegpt_file(tmp_path, conv)
    with pytest.raises(DataError, match="prompt with no answer"):
        load("d", tmp_path)
    conv = [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]
    sharegpt_file(tmp_path, conv)
    with pytest.raises(DataError, match="message 1 has role 'bot'; expected one of"):
        load("d", tmp_path)


def test_empty_response(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "  "}]
    write_info(tmp_path, {"d": {"file_name": "d.jsonl"}}, {"d.jsonl": "\n".join(map(json.dumps, rows))})
    with pytest.raises(DataError, match=r"d\.jsonl, row 1 \(line 2\): empty response"):
        load("d", tmp_path)
    conv = [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]
    sharegpt_file(tmp_path, conv)
    with pytest.raises(DataError, match="empty response in message 1"):
        load("d", tmp_path)


def test_pt_missing_or_empty_text(tmp_path):
    write_info(tmp_path, {"d": {"file_name": "d.jsonl"}}, {"d.jsonl": '{"content": "x"}\n{"content": ""}\n'})
    with pytest.raises(DataError, match="missing column 'text'"):
        load("d", tmp_path, stage="pt")
    write_info(tmp_path, {"d": {"file_name": "d.jsonl", "columns": {"prompt": "content"}}})
    with pytest.raises(DataError, match=r"row 1 \(line 2\): empty text"):
        load("d", tmp_path, stage="pt")


def test_hub_and_script_urls_refused(tmp_path):
    write_info(tmp_path, {"h": {"hf_hub_url": "org/data"}, "s": {"script_url": "x.py"}})
    for name in ("h", "s"):
        (spec,) = resolve_datasets(name, tmp_path)
        with pytest.raises(DataError, match=f"dataset '{name}' points to a remote source.*local files only"):
            load_rows(spec, tmp_path)


def test_missing_file(tmp_path):
    write_info(tmp_path, {"d": {"file_name": "gone.json"}})
    with pytest.raises(DataError, match=r"gone\.json does not exist"):
        load("d", tmp_path)


def test_skip_invalid_counts_drops(tmp_path):
    rows = [
        {"instruction": "a", "output": "b"},
        {"instruction": "c", "output": ""},
        {"instruction": "", "output": "d"},
        {"instruction": "e", "output": "f"},
    ]
    write_info(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": rows})
    _, _, convs, skipped = load("d", tmp_path, skip_invalid=True)
    assert skipped == 2 and [c.messages[0].content for c in convs] == ["a", "e"]
    with pytest.raises(DataError):
        load("d", tmp_path, skip_invalid=False)


# --- mixing, splitting, sampling --------------------------------------------------------------


def numbered(n, offset=0):
    import datasets

    return datasets.Dataset.from_dict({"i": list(range(offset, offset + n))})


def test_mix_concat_and_interleave():
    a, b = numbered(4), numbered(2, offset=100)
    assert list(mix_datasets([a, b], "concat")["i"]) == [0, 1, 2, 3, 100, 101]
    assert list(mix_datasets([a, b], "interleave_under")["i"]) == [0, 100, 1, 101]  # b runs out
    over = list(mix_datasets([a, b], "interleave_over")["i"])
    assert sorted(set(over)) == [0, 1, 2, 3, 100, 101] and len(over) == 8
    p1 = list(mix_datasets([a, b], "interleave_under", probs=[0.5, 0.5], seed=1)["i"])
    assert p1 == list(mix_datasets([a, b], "interleave_under", probs=[0.5, 0.5], seed=1)["i"])
    with pytest.raises(DataError, match="sum to 1"):
        mix_datasets([a, b], "interleave_under", probs=[0.5, 0.6])
    with pytest.raises(DataError, match="mix_strategy 'zip'"):
        mix_datasets([a, b], "zip")


def test_mix_our_datasets_with_max_samples():
    specs = resolve_datasets("megatune_identity,megatune_chat", OUR_DATA)
    parts = [load_rows(s, OUR_DATA, max_samples=5) for s in specs]
    assert [len(p) for p in parts] == [5, 5]
    assert len(mix_datasets(parts, "concat")) == 10
    assert len(mix_datasets(parts, "interleave_over", probs=[0.3, 0.7], seed=0)) >= 10


def test_split_validation():
    data = numbered(20)
    train, val = split_validation(data, 0.25, seed=0)
    assert (len(train), len(val)) == (15, 5)
    assert sorted(list(train["i"]) + list(val["i"])) == list(range(20))
    train, val = split_validation(data, 3, seed=0)
    assert (len(train), len(val)) == (17, 3)
    assert split_validation(data, 0) == (data, None)
    with pytest.raises(DataError, match="leaves no training rows"):
        split_validation(data, 20)


def test_num_samples(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    write_info(
        tmp_path,
        {"few": {"file_name": "d.json", "num_samples": 4}, "many": {"file_name": "d.json", "num_samples": 23}},
        {"d.json": rows},
    )
    (few,) = resolve_datasets("few", tmp_path)
    first = list(load_rows(few, tmp_path)["instruction"])
    assert len(first) == 4 and first == list(load_rows(few, tmp_path)["instruction"])  # deterministic
    (many,) = resolve_datasets("many", tmp_path)
    got = list(load_rows(many, tmp_path)["instruction"])
    assert len(got) == 23 and all(got.count(f"q{i}") >= 2 for i in range(10))
    assert len(load_rows(many, tmp_path, max_samples=7)) == 7


def test_streaming(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)]
    write_info(tmp_path, {"d": {"file_name": "d.jsonl"}}, {"d.jsonl": "\n".join(map(json.dumps, rows))})
    (spec,) = resolve_datasets("d", tmp_path)
    stream = load_rows(spec, tmp_path, streaming=True)
    convs, skipped = convert_rows(stream, spec)
    assert len(convs) == 6 and skipped == 0
    train, val = split_validation(stream, 2)
    assert len(list(train)) == 4 and len(list(val)) == 2
