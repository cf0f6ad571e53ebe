"""Human-readable view of a processed sample: which tokens are learned, which are masked."""

from __future__ import annotations

import sys

from megatune.data.processors import IGNORE, Sample

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


def spans(sample: Sample) -> list[tuple[bool, list[int]]]:
    """Runs of consecutive tokens sharing the same learned/masked state."""
    out: list[tuple[bool, list[int]]] = []
    for token, label in zip(sample.input_ids, sample.labels):
        learned = label != IGNORE
        if out and out[-1][0] == learned:
            out[-1][1].append(token)
        else:
            out.append((learned, [token]))
    return out


def render(sample: Sample, tokenizer, color: bool | None = None) -> str:
    """Learned text in green, masked text dimmed; without colour, learned spans go in ⟦ ⟧."""
    color = sys.stdout.isatty() if color is None else color
    parts = []
    for learned, tokens in spans(sample):
        text = tokenizer.decode(tokens)
        if color:
            parts.append(f"{GREEN if learned else DIM}{text}{RESET}")
        else:
            parts.append(f"⟦{text}⟧" if learned else text)
    return "".join(parts)
