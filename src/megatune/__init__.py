"""megatune: full-parameter fine-tuning of Hugging Face LLMs on Megatron-core."""

__version__ = "0.1.0"
