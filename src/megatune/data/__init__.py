"""LLaMA-Factory-compatible data pipeline: registry -> converters -> templates -> processors -> collator."""
