"""Write megatune's small image demo set: data/megatune_images/*.png and data/megatune_vision.json.

Twelve tiny PNGs (four colours x three shapes, on white, a few hundred bytes each, three sizes)
and sharegpt rows about them: the colour of one shape, its name, two shapes compared in one
turn, and a two-turn chat with one image per turn. A model has to look at the image to answer,
and the answers are short and regular, so a small model learns them in a few hundred steps.

Deterministic: running it again rewrites identical files.  Usage: python scripts/make_vision_demo.py
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

DATA = Path(__file__).resolve().parents[1] / "data"
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((64, 64), (96, 64), (64, 96))  # width, height: square, wide, tall


def draw(shape: str, colour: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    pen = ImageDraw.Draw(image)
    side = min(width, height) * 3 // 4
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(left + side // 2, top), (left, top + side), (left + side, top + side)], fill=colour)
    return image


def turn(who: str, text: str) -> dict:
    return {"from": who, "value": text}


def main() -> None:
    folder = DATA / "megatune_images"
    folder.mkdir(parents=True, exist_ok=True)
    items = []  # (relative path, colour, shape)
    for i, (colour, shape) in enumerate(itertools.product(COLOURS, SHAPES)):
        name = f"{colour}_{shape}.png"
        draw(shape, COLOURS[colour], SIZES[i % len(SIZES)]).save(folder / name, optimize=True)
        items.append((f"megatune_images/{name}", colour, shape))

    rng = random.Random(0)
    rows = []
    for path, colour, shape in items:
        rows.append({"conversations": [turn("human", "<image>What colour is the shape?"),
                                       turn("gpt", f"It is {colour}.")], "images": [path]})
        rows.append({"conversations": [turn("human", "What shape is in this picture?<image>"),
                                       turn("gpt", f"A {colour} {shape}.")], "images": [path]})
    for _ in range(8):  # two images in one turn
        (p1, c1, s1), (p2, c2, s2) = rng.sample(items, 2)
        answer = f"Yes, both are {c1}." if c1 == c2 else f"No: the first is {c1}, the second is {c2}."
        rows.append({"conversations": [turn("human", "<image><image>Are these two shapes the same colour?"),
                                       turn("gpt", answer)], "images": [p1, p2]})
    for _ in range(6):  # one image per turn, two turns
        (p1, c1, s1), (p2, c2, s2) = rng.sample(items, 2)
        rows.append({"conversations": [turn("human", "<image>Name the shape."), turn("gpt", f"A {s1}."),
                                       turn("human", "And this one?\n<image>"), turn("gpt", f"A {s2}, {c2}.")],
                     "images": [p1, p2]})
    rng.shuffle(rows)
    (DATA / "megatune_vision.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(items)} images to {folder} and {len(rows)} rows to {DATA / 'megatune_vision.json'}")


if __name__ == "__main__":
    main()
