"""Torch-native Megatron layer pieces, used when Transformer Engine is absent."""
