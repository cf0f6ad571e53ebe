"""`stage: sft`: supervised fine-tuning on conversations. Each row is rendered with the chat
template into (prompt, response) turns; prompts are masked from the loss (unless
`train_on_prompt`), earlier answers too with `mask_history`, and over-long rows are truncated
to `cutoff_len` (data/processors.py)."""

from __future__ import annotations

from megatune.data.processors import supervised_sample
from megatune.data.registry import DataError
from megatune.stages.base import LanguageModelStage


class SupervisedStage(LanguageModelStage):
    name = "sft"

    def prepare_tokenizer(self, config, tokenizer) -> str | None:
        """LLaMA-Factory's replace_eos for a named template (templates.apply_template_eos)."""
        from megatune.data.templates import apply_template_eos, get_template

        if not config.data.template or config.data.template == "auto":
            return None
        return apply_template_eos(tokenizer, get_template(config.data.template))

    def encode(self, row, spec, source, template, tokenizer, data_config) -> dict:
        from megatune.data.converters import to_conversation

        d = data_config
        conversation = to_conversation(row, spec, source, stage="sft")
        turns = template.encode(tokenizer, conversation, enable_thinking=d.enable_thinking)
        sample = supervised_sample(turns, d.cutoff_len, d.train_on_prompt, d.mask_history)
        if sample is None:
            raise DataError(f"{source}: nothing left to learn after truncation to cutoff_len={d.cutoff_len}")
        return {"input_ids": sample.input_ids, "labels": sample.labels, "truncated": sample.truncated}
