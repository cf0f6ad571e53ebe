"""Write a random-weight Qwen2-VL checkpoint with Qwen2-VL-7B's shape (optionally fewer decoder
layers), its image processor and the offline tokenizer, plus a synthetic multimodal dataset of
images of one size (no hub access).

    python benchmarks/vl_shape.py --output_dir /tmp/qwen2vl7b --layers 8 --data_dir /tmp/vl_data --image_size 512
"""

from __future__ import annotations

import argparse
import json
import os
import random

import torch

# Qwen2-VL-7B-Instruct's config.json (text model and vision tower).
TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]))
VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, in_chans=3,
              patch_size=14, spatial_merge_size=2, temporal_patch_size=2)


def write_model(out: str, layers: int) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2VLImageProcessor

    from megatune.tiny import tiny_vl_token_ids
    from megatune.tiny_tokenizer import make_tiny_tokenizer

    ids = tiny_vl_token_ids()  # the offline tokenizer's vision tokens
    text = {**TEXT, "num_hidden_layers": layers, **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    config = AutoConfig.for_model(
        "qwen2_vl", text_config=text, vision_config=VISION, tie_word_embeddings=False,
        **{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")},
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    Qwen2VLImageProcessor(patch_size=14, temporal_patch_size=2, merge_size=2).save_pretrained(out)
    make_tiny_tokenizer(out, family="qwen")
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote Qwen2-VL-7B shape with {layers} layers ({n / 1e9:.2f}B parameters) to {out}")


def write_data(data_dir: str, rows: int, size: int) -> None:
    """`rows` sharegpt rows, each one `size` x `size` image (random blocks of colour) and a
    question/answer of a few hundred tokens; registered as `vl_bench` in dataset_info.json."""
    from PIL import Image

    os.makedirs(os.path.join(data_dir, "images"), exist_ok=True)
    rng = random.Random(0)
    words = ["red", "green", "blue", "square", "circle", "left", "right", "top", "bottom", "image", "shows", "a"]
    data = []
    for i in range(rows):
        img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        for _ in range(8):
            x, y = rng.randrange(size), rng.randrange(size)
            img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(size, x + 64), min(size, y + 64)))
        name = f"images/{i}.png"
        img.save(os.path.join(data_dir, name))
        answer = " ".join(rng.choice(words) for _ in range(150))
        data.append({"conversations": [{"from": "human", "value": "<image>Describe the picture."},
                                       {"from": "gpt", "value": answer}], "images": [name]})
    with open(os.path.join(data_dir, "vl_bench.json"), "w") as f:
        json.dump(data, f)
    info = {"vl_bench": {"file_name": "vl_bench.json", "formatting": "sharegpt",
                         "columns": {"messages": "conversations", "images": "images"},
                         "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}}
    with open(os.path.join(data_dir, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    print(f"wrote {rows} rows with {size}x{size} images to {data_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--data_dir")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=512)
    args = parser.parse_args()
    if args.output_dir:
        write_model(args.output_dir, args.layers)
    if args.data_dir:
        write_data(args.data_dir, args.rows, args.image_size)
