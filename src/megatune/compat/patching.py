"""The one mechanism behind every runtime patch of Megatron-core: a named attribute replaced
once, with the reason recorded next to it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Patch:
    module: str  # dotted module path whose attribute is replaced ('pkg.mod' or 'pkg.mod:Class')
    attr: str
    make: Callable[[Any], Any]  # original -> replacement
    why: str


def _resolve(path: str):
    module_path, _, cls = path.partition(":")
    target = importlib.import_module(module_path)
    return getattr(target, cls) if cls else target


def apply_patches(patches: list[Patch], applied: list[Patch]) -> list[Patch]:
    """Apply each patch not yet in `applied` (which records them); return all applied."""
    for patch in patches:
        if patch in applied:
            continue
        target = _resolve(patch.module)
        setattr(target, patch.attr, patch.make(getattr(target, patch.attr)))
        applied.append(patch)
    return list(applied)
