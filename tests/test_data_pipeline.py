"""The data pipeline end to end, through the `megatune data` command and the Python API."""

import json
from pathlib import Path

import pytest

from megatune.config import load_config
from megatune.data.pipeline import build_samples
from megatune.data.processors import IGNORE
from megatune.data.registry import DataError
from megatune.tiny_tokenizer import make_tiny_tokenizer
from tests.conftest import REPO, SHARED, run_megatune

LF_DATA = SHARED / "fixtures" / "lf_data"
QWEN3_TEMPLATE = SHARED / "fixtures" / "chat_templates" / "qwen3.jinja"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(str(path), family="qwen")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def config_for(**overrides):
    base = {"dataset": "megatune_identity,megatune_chat", "dataset_dir": str(REPO / "data"), "template": "qwen3", "cutoff_len": 256}
    return load_config(None, {**base, **overrides})


def test_data_command_writes_samples_and_summary(tokenizer_dir, tmp_path):
    out = tmp_path / "samples.jsonl"
    result = run_megatune(
        "data", "--model_name_or_path", tokenizer_dir, "--dataset", "megatune_identity,megatune_chat",
        "--dataset_dir", str(REPO / "data"), "--template", "qwen3", "--packing", "true",
        "--cutoff_len", "256", "--output", str(out),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert f"wrote {len(rows)} samples" in result.stdout
    summary = next(line for line in result.stdout.splitlines() if line.startswith("samples="))
    assert "dropped=0" in summary and "packing_efficiency=" in summary
    assert "⟦" in result.stdout  # preview marks learned spans when not on a terminal
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["doc_lens"]) <= 256
    assert sum(len(r["doc_lens"]) for r in rows) == 40  # 30 identity rows + 10 chats, none lost


def test_data_command_streams_the_same_samples(tokenizer_dir, tmp_path, megatune_in_process):
    """`streaming: true`: one pass over the stream, written as read, equal to the in-memory path.
    (The command runs in this process; test_data_command_writes_samples_and_summary runs it as a
    user does.)"""
    outputs = {}
    for streaming in ("false", "true"):
        out = tmp_path / f"samples_{streaming}.jsonl"
        result = megatune_in_process(
            "data", "--model_name_or_path", tokenizer_dir, "--dataset", "megatune_chat,megatune_identity",
            "--dataset_dir", str(REPO / "data"), "--template", "qwen3", "--cutoff_len", "128", "--max_samples", "4",
            "--streaming", streaming, "--val_size", "2", "--output", str(out),  # no split here
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "wrote 8 samples" in result.stdout and "⟦" in result.stdout
        outputs[streaming] = [json.loads(line) for line in out.read_text().splitlines()]
    assert "streaming, epoch 0 read so far: samples=8" in result.stdout
    assert outputs["true"] == outputs["false"]


def test_sft_masks_prompts_and_learns_answers(tokenizer):
    samples, stats = build_samples(config_for(dataset="megatune_identity"), tokenizer)
    assert stats.samples == 30 and stats.dropped == 0
    first = samples[0]
    learned = tokenizer.decode([t for t, l in zip(first.input_ids, first.labels) if l != IGNORE])
    masked = tokenizer.decode([t for t, l in zip(first.input_ids, first.labels) if l == IGNORE])
    assert "<|im_start|>user" in masked and "<|im_start|>" not in learned
    assert learned.endswith("<|im_end|>\n")


def test_two_workers_give_the_same_samples(tokenizer):
    one, _ = build_samples(config_for(preprocessing_num_workers=1), tokenizer)
    two, _ = build_samples(config_for(preprocessing_num_workers=2), tokenizer)
    assert [s.input_ids for s in one] == [s.input_ids for s in two]
    assert [s.labels for s in one] == [s.labels for s in two]


def test_tokenized_path_caches_reloads_and_refuses_other_settings(tokenizer, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(REPO / "data", data)
    cache = str(tmp_path / "tok_cache")
    settings = dict(tokenized_path=cache, dataset_dir=str(data))
    first, _ = build_samples(config_for(**settings), tokenizer)
    assert (Path(cache) / "megatune_encoding.json").is_file()
    # Edit the data: a reload with the same settings reads the cache, not the files.
    identity = data / "megatune_identity.json"
    identity.write_text(identity.read_text().replace("megatune", "EDITED"))
    again, _ = build_samples(config_for(**settings), tokenizer)
    assert [s.input_ids for s in again] == [s.input_ids for s in first]
    packed, _ = build_samples(config_for(**settings, packing=True), tokenizer)  # packing comes after the cache
    assert sum(len(s.input_ids) for s in packed) == sum(len(s.input_ids) for s in first)
    # Settings the encoding depends on: refused, naming what changed and the way out.
    with pytest.raises(DataError, match=r"tok_cache was encoded with other settings \(cutoff_len: 256 there, 128 now\); "
                                         r"set overwrite_cache: true"):
        build_samples(config_for(**settings, cutoff_len=128), tokenizer)
    with pytest.raises(DataError, match=r"dataset: 'megatune_identity,megatune_chat' there, 'megatune_chat' now"):
        build_samples(config_for(**settings, dataset="megatune_chat"), tokenizer)
    # overwrite_cache re-encodes (the edit shows up) and the new settings then load.
    fresh, _ = build_samples(config_for(**settings, cutoff_len=128, overwrite_cache=True), tokenizer)
    assert "EDITED" in "".join(tokenizer.decode(s.input_ids) for s in fresh)
    reloaded, _ = build_samples(config_for(**settings, cutoff_len=128), tokenizer)
    assert [s.input_ids for s in reloaded] == [s.input_ids for s in fresh]
    # A cache encoded under older encoding rules (before the key existed) is refused too.
    fingerprint_file = Path(cache) / "megatune_encoding.json"
    saved = json.loads(fingerprint_file.read_text())
    fingerprint_file.write_text(json.dumps({k: v for k, v in saved.items() if k != "encoding_rules"}))
    with pytest.raises(DataError, match=r"encoding_rules: None there, \d+ now"):
        build_samples(config_for(**settings, cutoff_len=128), tokenizer)
    # A cache without the fingerprint (interrupted save, or another tool's) is not trusted.
    (Path(cache) / "megatune_encoding.json").unlink()
    with pytest.raises(DataError, match="holds no megatune_encoding.json"):
        build_samples(config_for(**settings, cutoff_len=128), tokenizer)


def test_bad_rows_fail_or_are_counted_with_skip_invalid(tokenizer, tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mixed": {"file_name": "mixed.json"}}))
    rows = [{"instruction": "Hi", "output": "Hello"}, {"instruction": "Bye", "output": ""}, {"instruction": "Yo", "output": "Hey"}]
    (tmp_path / "mixed.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"dataset 'mixed', file \S*mixed.json, row 1: .*skip_invalid: true"):
        build_samples(config_for(dataset="mixed", dataset_dir=str(tmp_path)), tokenizer)
    samples, stats = build_samples(config_for(dataset="mixed", dataset_dir=str(tmp_path), skip_invalid=True), tokenizer)
    assert (stats.samples, stats.dropped) == (2, 1)


def test_pretrain_chunks_text_to_cutoff(tokenizer, tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"corpus": {"file_name": "c.jsonl", "columns": {"prompt": "text"}}}))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": f"Line number {i} of the corpus."}) for i in range(40)))
    samples, _ = build_samples(config_for(dataset="corpus", dataset_dir=str(tmp_path), stage="pt", cutoff_len=32), tokenizer)
    assert samples and all(len(s.input_ids) == 32 and s.labels == s.input_ids for s in samples)
    eos = tokenizer.eos_token_id
    assert sum(s.input_ids.count(eos) for s in samples) >= 30


@pytest.mark.skipif(not LF_DATA.is_dir(), reason="../shared/fixtures absent")
def test_llama_factory_demo_sets_run_through_the_pipeline(tokenizer):
    for name in ("alpaca_en_demo", "identity", "glaive_toolcall_en_demo"):
        samples, stats = build_samples(config_for(dataset=name, dataset_dir=str(LF_DATA), template="qwen", cutoff_len=1024), tokenizer)
        assert stats.samples > 50 and stats.dropped == 0, name
        assert all(any(l != IGNORE for l in s.labels) for s in samples), name


def test_validation_split_by_fraction_count_and_eval_dataset(tokenizer):
    from megatune.data.pipeline import build_train_eval

    train, evals, _ = build_train_eval(config_for(dataset="megatune_identity", val_size=0.2), tokenizer)
    assert (len(train), len(evals)) == (24, 6)
    assert not {tuple(s.input_ids) for s in train} & {tuple(s.input_ids) for s in evals}
    train, evals, _ = build_train_eval(config_for(dataset="megatune_identity", val_size=5), tokenizer)
    assert (len(train), len(evals)) == (25, 5)
    train, evals, _ = build_train_eval(config_for(dataset="megatune_identity", eval_dataset="megatune_chat"), tokenizer)
    assert (len(train), len(evals)) == (30, 10)


def test_template_eos_replaces_the_tokenizer_eos_or_refuses_a_missing_token():
    from megatune.data.templates import apply_template_eos, get_template

    qwen = make_tiny_tokenizer(family="qwen")  # base: eos <|endoftext|>
    note = apply_template_eos(qwen, get_template("qwen3"))
    assert qwen.eos_token == "<|im_end|>" and "'<|endoftext|>' -> '<|im_end|>'" in note
    assert apply_template_eos(qwen, get_template("qwen3")) is None  # already done: no change
    assert apply_template_eos(qwen, get_template("alpaca")) is None  # no replace_eos
    llama = make_tiny_tokenizer(family="llama3")
    with pytest.raises(ValueError, match="template 'qwen3' ends answers with '<\\|im_end\\|>', which is not a token"):
        apply_template_eos(llama, get_template("qwen3"))
    assert llama.eos_token == "<|end_of_text|>"


def test_new_encoding_rules_miss_the_datasets_map_cache(tokenizer, tmp_path, monkeypatch):
    """datasets caches `map` results under a hash of the map function's state, not of the code
    it runs. An upgrade that encodes rows differently must not get the old encoding back from
    ~/.cache/huggingface: RowEncoder carries ENCODING_RULES in its state."""
    import shutil

    import megatune.data.encoding as encoding
    from megatune.stages.supervised import SupervisedStage

    shutil.copytree(REPO / "data", tmp_path / "data")
    config = config_for(dataset="megatune_identity", dataset_dir=str(tmp_path / "data"))
    calls = []
    plain_encode = SupervisedStage.encode

    def counted(self, *args, **kwargs):
        calls.append(1)
        return plain_encode(self, *args, **kwargs)

    monkeypatch.setattr(SupervisedStage, "encode", counted)
    first, _ = build_samples(config, tokenizer)
    encoded_first = len(calls)
    again, _ = build_samples(config, tokenizer)
    assert encoded_first == 30 and len(calls) == encoded_first  # same rules: datasets' cache serves it
    monkeypatch.setattr(encoding, "ENCODING_RULES", encoding.ENCODING_RULES + 1)
    build_samples(config, tokenizer)
    assert len(calls) == 2 * encoded_first  # new rules: every row encoded again
    assert [s.input_ids for s in first] == [s.input_ids for s in again]
