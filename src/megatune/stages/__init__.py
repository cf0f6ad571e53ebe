"""Training stages (pt, sft, dpo): what each computes from a micro-batch."""
