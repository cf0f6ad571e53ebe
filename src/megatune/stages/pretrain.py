"""`stage: pt`: continued pretraining on raw text. Each row's text is tokenized whole, the texts
are concatenated with eos between them and cut into `cutoff_len` blocks (the tail of an epoch is
dropped), every token learned."""

from __future__ import annotations

from typing import Iterable, Iterator

from megatune.data.processors import Sample, chunk_documents
from megatune.data.registry import DataError
from megatune.stages.base import LanguageModelStage


class PretrainStage(LanguageModelStage):
    name = "pt"

    def required_columns(self, spec) -> list[str]:
        return ["prompt"]

    def encode(self, row, spec, source, template, tokenizer, data_config) -> dict:
        from megatune.data.converters import to_conversation

        text = to_conversation(row, spec, source, stage="pt").messages[-1].content
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "labels": ids, "truncated": False}

    def assemble(self, docs: Iterable[Sample], cutoff_len: int, eos_id: int | None) -> Iterator[Sample]:
        if eos_id is None:
            raise DataError("stage pt needs the tokenizer's eos token to separate documents")
        return chunk_documents((d.input_ids for d in docs), eos_id, cutoff_len)
