"""`streaming: true`: the lazily read StreamSource gives the map path's samples, in a seeded,
per-epoch order that resumes exactly, with bounded memory and clear errors."""

import itertools
import json
from collections import Counter

import pytest

from megatune.config import load_config
from megatune.data.pipeline import build_samples
from megatune.data.source import build_train_source
from megatune.data.processors import IGNORE
from megatune.data.registry import DataError
from megatune.data.streaming import StreamSource, build_stream_source
from megatune.tiny_tokenizer import make_tiny_tokenizer
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(str(path), family="qwen")
    return AutoTokenizer.from_pretrained(str(path))


def config_for(**overrides):
    base = {
        "dataset": "megatune_identity,megatune_chat",
        "dataset_dir": str(REPO / "data"),
        "template": "qwen3",
        "cutoff_len": 256,
        "streaming": True,
    }
    return load_config(None, {**base, **overrides})


def key(sample):
    return (tuple(sample.input_ids), tuple(sample.labels))


def take(source, batches):
    return [key(s) for _ in range(batches) for s in source.next_global_batch()]


def write_dataset(folder, name, file_name, rows, **entry):
    (folder / "dataset_info.json").write_text(json.dumps({name: {"file_name": file_name, **entry}}))
    (folder / file_name).write_text("\n".join(map(json.dumps, rows)) + ("\n" if rows else ""))


def test_one_epoch_equals_the_map_path_samples(tokenizer):
    source, evals, stats = build_train_source(config_for(), tokenizer, 4)
    assert source.steps_per_epoch is None and evals == []
    batches = [source.next_global_batch() for _ in range(10)]  # 30 + 10 rows, batches of 4
    assert all(len(b) == 4 for b in batches)
    streamed = [key(s) for b in batches for s in b]
    mapped, _ = build_samples(config_for(streaming=False), tokenizer)
    assert Counter(streamed) == Counter(map(key, mapped))
    assert streamed != [key(s) for s in mapped]  # shuffled, not file order
    assert (stats.samples, stats.dropped, stats.epoch) == (40, 0, 0) and "streaming" in stats.line()
    assert source.state_dict()["epoch"] == 0 and source.state_dict()["position"] == 40
    source.next_global_batch()
    assert (source.state_dict()["epoch"], source.state_dict()["position"]) == (1, 4)


def test_seeded_order_is_deterministic_and_reshuffled_each_epoch(tokenizer):
    run = lambda seed: take(build_train_source(config_for(seed=seed), tokenizer, 5)[0], 16)  # noqa: E731
    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other
    epoch0, epoch1 = first[:40], first[40:80]
    assert Counter(epoch0) == Counter(epoch1) and epoch0 != epoch1


@pytest.mark.parametrize("stop_after", [1, 13, 15])
def test_resume_continues_exactly(tokenizer, stop_after):
    # 40 samples in batches of 3: 13 steps per epoch, one sample of each epoch dropped.
    uninterrupted = take(build_train_source(config_for(), tokenizer, 3)[0], 20)
    first, _, _ = build_train_source(config_for(), tokenizer, 3)
    assert take(first, stop_after) == uninterrupted[: 3 * stop_after]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as plain data
    resumed, _, _ = build_train_source(config_for(), tokenizer, 3)
    resumed.load_state_dict(state)
    assert take(resumed, 20 - stop_after) == uninterrupted[3 * stop_after:]


def test_resume_refuses_another_seed_or_a_map_checkpoint(tokenizer):
    source, _, _ = build_train_source(config_for(), tokenizer, 4)
    with pytest.raises(DataError, match="seed 1 \\(now 42\\)"):
        source.load_state_dict({**source.state_dict(), "seed": 1})
    with pytest.raises(DataError, match="without streaming"):
        source.load_state_dict({"epoch": 0, "position": 4, "seed": 42, "num_samples": 40})


def test_pt_chunks_like_the_map_path(tokenizer, tmp_path):
    write_dataset(tmp_path, "corpus", "c.jsonl", [{"text": f"Line number {i} of the corpus."} for i in range(40)], columns={"prompt": "text"})
    keys = {"dataset": "corpus", "dataset_dir": str(tmp_path), "stage": "pt", "cutoff_len": 32}
    cfg = config_for(**keys)
    mapped, _ = build_samples(config_for(**keys, streaming=False), tokenizer)
    assert len(mapped) > 5
    in_order, _, _ = build_stream_source(cfg, tokenizer, 1, shuffle_buffer=0)
    assert take(in_order, len(mapped)) == [key(s) for s in mapped]  # same blocks, same order
    assert in_order.state_dict()["epoch"] == 0
    in_order.next_global_batch()
    assert in_order.state_dict()["epoch"] == 1  # the tail shorter than a block was dropped
    shuffled, _, _ = build_train_source(cfg, tokenizer, 1)
    blocks = [shuffled.next_global_batch()[0] for _ in range(len(mapped))]
    assert all(len(s.input_ids) == 32 and s.labels == s.input_ids for s in blocks)
    assert sum(s.input_ids.count(tokenizer.eos_token_id) for s in blocks) >= 30
    assert [key(s) for s in blocks] != [key(s) for s in mapped]  # documents were shuffled first


def test_packing_respects_cutoff_and_keeps_every_document(tokenizer):
    cfg = config_for(packing=True)
    source, _, stats = build_stream_source(cfg, tokenizer, 1, pack_buffer=8)
    packed = []
    while source.state_dict()["epoch"] == 0 or not packed:
        packed += source.next_global_batch()
    packed.pop()  # the first sample of epoch 1
    assert len(packed) < 40
    docs = []
    for s in packed:
        assert len(s.input_ids) == len(s.labels) == sum(s.doc_lens) <= 256
        starts = list(itertools.accumulate([0] + s.doc_lens))
        docs += [(tuple(s.input_ids[a:b]), tuple(s.labels[a:b])) for a, b in zip(starts, starts[1:])]
    mapped, _ = build_samples(config_for(streaming=False), tokenizer)
    assert Counter(docs) == Counter(map(key, mapped))
    assert stats.packing_efficiency is not None and 0 < stats.packing_efficiency <= 1


def test_interleaved_datasets_stream(tokenizer):
    cfg = config_for(mix_strategy="interleave_under", interleave_probs="0.5,0.5")
    runs = []
    for _ in range(2):
        source, _, _ = build_stream_source(cfg, tokenizer, 1, shuffle_buffer=0)
        served = []
        while source.state_dict()["epoch"] == 0:
            served += take(source, 1)
        runs.append(served[:-1])
    assert runs[0] == runs[1]
    identity, _ = build_samples(config_for(dataset="megatune_identity", streaming=False), tokenizer)
    chats, _ = build_samples(config_for(dataset="megatune_chat", streaming=False), tokenizer)
    from_chat = [k for k in runs[0] if k in set(map(key, chats))]
    assert from_chat == [key(s) for s in chats]  # stops when the chats run out: all of them, in order
    assert 0 < len(runs[0]) - len(from_chat) < 30 and set(runs[0]) <= set(map(key, identity + chats))


def test_bad_row_is_named_or_skipped_and_counted(tokenizer, tmp_path):
    rows = [{"instruction": "Hi", "output": "Hello"}, {"instruction": "Bye", "output": ""}, {"instruction": "Yo", "output": "Hey"}]
    write_dataset(tmp_path, "mixed", "mixed.jsonl", rows)
    with pytest.raises(DataError, match=r"dataset 'mixed', file \S*mixed.jsonl, row 1.*skip_invalid: true"):
        build_train_source(config_for(dataset="mixed", dataset_dir=str(tmp_path)), tokenizer, 1)
    source, _, stats = build_train_source(config_for(dataset="mixed", dataset_dir=str(tmp_path), skip_invalid=True), tokenizer, 1)
    served = take(source, 2)
    assert len(served) == 2 and (stats.samples, stats.dropped) == (2, 1)
    source.next_global_batch()
    assert source.state_dict()["epoch"] == 1
    good = {"input_ids": [1, 2], "labels": [IGNORE, 2], "truncated": False, "error": ""}
    broken = StreamSource([good, {**good, "error": "row 1: broken"}], 1, seed=0, cutoff_len=8)
    for _ in range(2):  # a retry fails again; it does not pass for the end of the epoch
        with pytest.raises(DataError, match="row 1: broken; fix the data"):
            broken.next_global_batch()
    assert broken.state_dict()["epoch"] == 0


def test_unreadable_json_line_is_located(tokenizer, tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"broken": {"file_name": "b.jsonl"}}))
    (tmp_path / "b.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a",\n')
    with pytest.raises(DataError, match=r"dataset 'broken', file .*b.jsonl, row 1 \(line 2\): invalid JSON"):
        build_train_source(config_for(dataset="broken", dataset_dir=str(tmp_path)), tokenizer, 1)


def test_empty_or_too_small_stream_fails_instead_of_looping(tokenizer, tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"empty": {"file_name": "e.jsonl"}}))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="dataset 'empty': .*e.jsonl holds no rows"):
        build_train_source(config_for(dataset="empty", dataset_dir=str(tmp_path)), tokenizer, 1)
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no samples in epoch 0; the stream is empty"):
        build_train_source(config_for(dataset="empty", dataset_dir=str(tmp_path)), tokenizer, 1)
    with pytest.raises(DataError, match="the stream is empty"):
        StreamSource([], 1, seed=0, cutoff_len=8).next_global_batch()
    write_dataset(tmp_path, "bad", "b.jsonl", [{"instruction": "q", "output": ""}] * 3)
    with pytest.raises(DataError, match="3 bad rows were dropped"):
        build_train_source(config_for(dataset="bad", dataset_dir=str(tmp_path), skip_invalid=True), tokenizer, 1)
    source, _, _ = build_train_source(config_for(dataset="megatune_chat"), tokenizer, 16)
    with pytest.raises(DataError, match="only 10 samples per epoch, fewer than one global batch \\(16\\)"):
        source.next_global_batch()


def test_validation_is_eval_dataset_or_the_first_rows(tokenizer):
    mapped, _ = build_samples(config_for(streaming=False), tokenizer)  # concat, file order
    source, evals, _ = build_train_source(config_for(val_size=5), tokenizer, 5)
    assert [key(s) for s in evals] == [key(s) for s in mapped[:5]]
    assert Counter(take(source, 7)) == Counter(map(key, mapped[5:]))
    _, evals, _ = build_train_source(config_for(dataset="megatune_identity", eval_dataset="megatune_chat"), tokenizer, 5)
    chats, _ = build_samples(config_for(dataset="megatune_chat", streaming=False), tokenizer)
    assert [key(s) for s in evals] == [key(s) for s in chats]
    with pytest.raises(DataError, match="row count"):
        build_train_source(config_for(val_size=0.2), tokenizer, 5)


def test_memory_stays_bounded_on_an_endless_stream():
    read = itertools.count()

    class Endless:  # far more rows than memory could hold; counts what is actually read
        def __iter__(self):
            for i in itertools.count():
                next(read)
                yield {"input_ids": [1, 2, i % 7 + 3], "labels": [IGNORE, 2, 3], "truncated": False, "error": ""}

    source = StreamSource(Endless(), 8, seed=0, cutoff_len=16, packing=True, shuffle_buffer=64, pack_buffer=32)
    batches = [source.next_global_batch() for _ in range(3)]
    assert all(len(b) == 8 and all(sum(s.doc_lens) <= 16 for s in b) for b in batches)
    # 24 bins of about 5 documents: one shuffle buffer of rows plus 4 pack windows were read.
    assert next(read) == 64 + 4 * 32
