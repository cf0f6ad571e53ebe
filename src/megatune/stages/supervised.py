"""`stage: sft`: supervised fine-tuning on conversations. Each row is rendered with the chat
template into (prompt, response) turns; prompts are masked from the loss (unless
`train_on_prompt`), earlier answers too with `mask_history`, and over-long rows are truncated
to `cutoff_len` (data/processors.py).

For a vision-language model, rows may carry images (data/multimodal.py): each `<image>` becomes
the template's image block with one image token per merged patch, image tokens are never
learned or cut (a row whose images do not fit `cutoff_len` is dropped and counted), and each
micro-batch carries its images' `pixel_values` and `image_grid_thw` in `Batch.extras`, processed
when the micro-batch is collated. A text-only model refuses image rows.
"""

from __future__ import annotations

from megatune.data.collator import Batch
from megatune.data.processors import Sample, supervised_sample
from megatune.data.registry import DataError
from megatune.stages.base import LanguageModelStage


class SupervisedStage(LanguageModelStage):
    name = "sft"

    def __init__(self, images=None, model_dir: str | None = None):
        """`images`: data.images.ImageProcessing of a vision-language model, else None."""
        self.images, self.model_dir = images, model_dir
        if images is not None:
            self.columns = (*LanguageModelStage.columns, "images", "image_grid_thw")
            self.empty_row = {**LanguageModelStage.empty_row, "images": [], "image_grid_thw": []}

    @classmethod
    def from_config(cls, config) -> "SupervisedStage":
        import os

        from megatune.models import accepts_images

        model_dir = config.model.model_name_or_path
        if model_dir and os.path.isfile(os.path.join(model_dir, "config.json")) and accepts_images(model_dir):
            from megatune.data.images import ImageProcessing

            d = config.data
            return cls(ImageProcessing.from_model_dir(model_dir, d.image_max_pixels, d.image_min_pixels), model_dir)
        return cls(model_dir=model_dir)

    @property
    def features(self) -> dict | None:
        """datasets.Features of the encoded columns when they hold images (datasets cannot infer
        an image column's type from text-only rows)."""
        if self.images is None:
            return None
        import datasets

        from megatune.data.multimodal import encoded_image_features

        return {"input_ids": datasets.Sequence(datasets.Value("int64")), "labels": datasets.Sequence(datasets.Value("int64")),
                "truncated": datasets.Value("bool"), "error": datasets.Value("string"), **encoded_image_features()}

    def fingerprint(self) -> dict:
        return {} if self.images is None else self.images.fingerprint()

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
        if self.images is not None:
            return self._encode_with_images(conversation, spec, template, tokenizer, d)
        if conversation.images:
            from megatune.data.multimodal import refuse_images

            refuse_images(conversation, f"model {self.model_dir} has no vision tower")
        turns = template.encode(tokenizer, conversation, enable_thinking=d.enable_thinking)
        sample = supervised_sample(turns, d.cutoff_len, d.train_on_prompt, d.mask_history)
        if sample is None:
            raise DataError(f"{source}: nothing left to learn after truncation to cutoff_len={d.cutoff_len}")
        return {"input_ids": sample.input_ids, "labels": sample.labels, "truncated": sample.truncated}

    def _encode_with_images(self, conversation, spec, template, tokenizer, d) -> dict:
        from megatune.data.multimodal import encode_image_conversation

        try:
            return encode_image_conversation(
                conversation, template, tokenizer, self.images, d.cutoff_len, train_on_prompt=d.train_on_prompt,
                mask_history=d.mask_history, enable_thinking=d.enable_thinking, dataset_dir=spec.dataset_dir,
            ).as_row()
        except ValueError as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"{conversation.source}: {err}") from None

    def to_sample(self, encoded: dict) -> Sample:
        sample = super().to_sample(encoded)
        if self.images is not None:
            sample.images = list(encoded["images"] or [])
            sample.image_grid_thw = [list(g) for g in encoded["image_grid_thw"] or []]
        return sample

    def collate(self, samples: list, pad_id: int, pad_multiple: int, packed: bool) -> Batch:
        batch = super().collate(samples, pad_id, pad_multiple, packed)
        if self.images is not None and any(s.images for s in samples):
            from megatune.data.multimodal import collate_images

            batch.extras.update(collate_images(samples, self.images))
        return batch
