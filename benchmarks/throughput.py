"""Training throughput of `megatune train`'s step on a named real model shape (random weights,
synthetic tokens), with the same-call transformers baseline and an optional kernel-time profile.

    python benchmarks/throughput.py --shape qwen3-1.7b --seq_len 4096 --grad_accum 8 \
        --paths plain fast --baseline hf --profile fast --out /tmp/tp.jsonl

Each megatune path runs in its own process (so one path's compiled kernels and patches cannot
leak into another's numbers) through the trainer's own pieces: models/build.py's build_model,
the HF weight loader, engine/optim.py's DDP + Megatron optimizer, and engine/step.py's
train_step over collated micro-batches, as engine/trainer.py calls them.

Paths:
  plain  today's defaults (bias_activation_fusion on, everything else off).
  fast   layers/fused.py's enable_fast_path() + compiled RMSNorm (persist_layer_norm), RoPE
         (apply_rope_fusion), gradient_accumulation_fusion, fused linear+CE
         (layers/cross_entropy.py), fused AdamW (engine/optim.py, on in both paths on CUDA
         unless --no_fused_adam), and micro-batches moved to the GPU before the step, so the
         schedule's `.to(device)` copies no longer drain the GPU queue (3 host syncs per
         micro-batch otherwise). The TransformerConfig fields are set by wrapping
         models/build.py's transformer_config here until build.py sets them from the config.

Vision-language shapes (`qwen2-vl-7b`, or `qwen2-vl-7b-8l` for its first 8 decoder layers; the
vision tower is always whole): benchmarks/vl_shape.py writes the model and a multimodal dataset
(one `--image_size` square image and a ~600-token answer per row) in <model_dir>_data<image_size>;
every step's global batch comes from megatune's data pipeline (stage sft, template qwen2_vl, cutoff_len =
--seq_len, one row per sequence, no packing), prepared before the timed step, and the baseline
(benchmarks/hf_vl_train_baseline.py) trains transformers' Qwen2-VL on exactly those batches. FLOPs
then add the vision tower's (models/qwen2_vl.py's formula) and count real tokens only.

    python benchmarks/throughput.py --shape qwen2-vl-7b-8l --seq_len 1024 --micro_batch 4 \
        --grad_accum 2 --paths fast --baseline hf

FLOPs (the same formula as engine/metrics.py and DESIGN.md §4): 6 x matmul params x tokens
(embedding lookups free, the output layer counted) + causal attention 6 x heads x head_dim x
sum(seq^2) x layers. MFU is against 989 TFLOP/s (H100/H200 dense bf16).

Output: one JSON line per run on stdout (and appended to --out): path, tokens_per_s_per_gpu,
tflops_per_gpu, mfu, peak_mem_gb, step_s (mean of timed steps), losses, flop_formula.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEAK_TFLOPS = 989.0
FLOP_FORMULA = ("6 * matmul_params * tokens + 6 * heads * head_dim * sum(seq_len^2) * layers "
                "(engine/metrics.py step_flops; embedding lookups not counted, output layer counted)")


VL_FLOPS = "; plus the vision tower's matmuls and attention per image (models/qwen2_vl.py), real tokens only"
VL_SHAPE = re.compile(r"qwen2-vl-7b(?:-(\d+)l)?$")  # Qwen2-VL-7B, optionally its first N decoder layers


def vl_data_dir(model_dir: str, image_size: int) -> str:
    return f"{model_dir.rstrip('/')}_data{image_size}"


def ensure_model(shape: str, model_dir: str, image_size: int = 512) -> None:
    """Write the random-weight checkpoint of `shape` to `model_dir` (and, for a vision-language
    shape, its dataset to vl_data_dir(model_dir, image_size)) unless they exist."""
    sys.path.insert(0, str(HERE))
    vl = VL_SHAPE.match(shape)
    if vl:
        import vl_shape

        if not (Path(model_dir) / "config.json").is_file():
            vl_shape.write_model(model_dir, int(vl.group(1) or vl_shape.TEXT["num_hidden_layers"]))
        if not (Path(vl_data_dir(model_dir, image_size)) / "dataset_info.json").is_file():
            vl_shape.write_data(vl_data_dir(model_dir, image_size), rows=64, size=image_size)
        return
    if (Path(model_dir) / "config.json").is_file():
        return
    from model_shapes import PRESETS, write_preset
    import torch

    if shape not in PRESETS:
        raise SystemExit(f"--shape {shape!r}: not a known shape; choose one of {sorted(PRESETS)}, "
                         "qwen2-vl-7b or qwen2-vl-7b-<N>l")
    write_preset(shape, model_dir, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Kernel-time breakdown


PARTS = [  # (part, regex on the kernel name), first match wins
    ("comms", r"nccl"),
    ("optimizer", r"adam|multi_tensor|foreach_norm|_foreach|lpnorm|l2norm"),
    ("attention", r"flash|fmha|cudnn|sdpa|attention|attn"),
    ("gemm", r"gemm|sm90_xmma|cutlass|nvjet|cublas|matmul|splitk|s16816|s1688|wgmma"),
    ("norm", r"rsqrt|rms|norm"),
    ("rope", r"cos|sin|rotary|rope"),
    ("cross_entropy", r"logsumexp|log_softmax|softmax|nll|cross_entropy|gather|scatter|exp"),
    ("swiglu", r"silu|sigmoid|swiglu|glu"),
    ("copy/cast", r"copy|cast|convert|fill"),
]


def classify(name: str) -> str:
    low = name.lower()
    for part, pattern in PARTS:
        if re.search(pattern, low):
            return part
    return "other elementwise"


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, end) intervals as sorted, disjoint intervals."""
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def exposed(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float:
    """Length of the time covered by `comm` intervals and by no `compute` interval (the
    communication nothing hides), in the intervals' unit."""
    comm, compute = merged(comm), merged(compute)
    total, j = 0.0, 0
    for s, e in comm:
        covered = 0.0
        while j < len(compute) and compute[j][1] <= s:
            j += 1
        k = j
        while k < len(compute) and compute[k][0] < e:
            covered += min(e, compute[k][1]) - max(s, compute[k][0])
            k += 1
        total += (e - s) - covered
    return total


def breakdown(prof, wall_us: float) -> dict:
    """Kernel time by part (share of summed kernel time, and ms), the share of wall time with no
    kernel running (union of kernel intervals), the communication kernels' time with no other
    kernel running beside them (exposed, ms), and where the GPU idled: gaps of 20 us or more
    grouped by the kernels that end and start them (total ms, count)."""
    kernels = []
    cpu_self: dict[str, float] = {}
    for evt in prof.events():
        # GPU-side user annotations (e.g. "Optimizer.step#AdamW.step") span kernels: not kernels.
        if getattr(evt, "is_user_annotation", False) or evt.name.startswith(("Optimizer.", "ProfilerStep")):
            continue
        if getattr(evt, "device_type", None) is not None and "CUDA" in str(evt.device_type):
            kernels.append((evt.time_range.start, evt.time_range.end, evt.name))
        else:
            cpu_self[evt.name[:80]] = cpu_self.get(evt.name[:80], 0.0) + evt.self_cpu_time_total
    total = sum(e - s for s, e, _ in kernels) or 1.0
    parts: dict[str, float] = {}
    top: dict[str, float] = {}
    kinds = [classify(name) for _, _, name in kernels]
    for (s, e, name), kind in zip(kernels, kinds):
        parts[kind] = parts.get(kind, 0.0) + (e - s)
        top[name[:160]] = top.get(name[:160], 0.0) + (e - s)
    busy, end, last = 0.0, -1.0, ""
    gaps: dict[str, list] = {}  # idle gaps >= 20 us, by the kernels either side: [ms, count]
    for s, e, name in sorted(kernels):
        if s > end:
            if end >= 0 and s - end >= 20:
                key = f"{last[:70]} -> {name[:70]}"
                gaps.setdefault(key, [0.0, 0])
                gaps[key][0] += (s - end) / 1e3
                gaps[key][1] += 1
            busy += e - s
            end, last = e, name
        elif e > end:
            busy += e - end
            end, last = e, name
    comm_exposed = exposed([(s, e) for (s, e, _), kind in zip(kernels, kinds) if kind == "comms"],
                           [(s, e) for (s, e, _), kind in zip(kernels, kinds) if kind != "comms"])
    return {
        "kernel_ms": total / 1e3,
        "wall_ms": wall_us / 1e3,
        "comms_exposed_ms": round(comm_exposed / 1e3, 2),
        "parts_ms": {k: round(v / 1e3, 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        "idle_share_of_wall": max(0.0, 1 - busy / wall_us) if wall_us else None,
        "parts": {k: round(v / total, 4) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": {k: round(v / 1e3, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:25]},
        "top_cpu_self_ms": {k: round(v / 1e3, 2) for k, v in sorted(cpu_self.items(), key=lambda kv: -kv[1])[:30]},
        "idle_gaps_ms_count": {k: [round(v[0], 2), v[1]] for k, v in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:15]},
    }


def transient_at_peak(snapshot: dict, top: int = 12) -> dict:
    """From a torch.cuda.memory snapshot recorded over one step: the allocations made during the
    step that were alive at its peak, grouped by their innermost megatune/megatron/torch-optim
    Python frames (GB per group), and the peak above the step's starting level."""
    trace = [e for dev in snapshot["device_traces"] for e in dev]
    live: dict[int, dict] = {}
    cur = peak = 0
    at_peak: list[dict] = []
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if cur > peak:
                peak, at_peak = cur, list(live.values())
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
    groups: dict[str, int] = {}
    for e in at_peak:
        frames = [f for f in e.get("frames", []) if re.search(r"megatune|megatron|optim|autograd", f["filename"])]
        key = " < ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in frames[:3]) or "?"
        groups[key] = groups.get(key, 0) + e["size"]
    return {
        "step_peak_above_start_gb": round(peak / 1024**3, 2),
        "alive_at_peak_gb": {k: round(v / 1024**3, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:top]},
    }


# ---------------------------------------------------------------------------------------------
# One megatune path (child process)


def vl_overrides(args) -> dict:
    """The config keys of a vision-language run (megatune's and the transformers baseline's)."""
    return {"stage": "sft", "dataset": "vl_bench", "dataset_dir": vl_data_dir(args.model_dir, args.image_size),
            "template": "qwen2_vl", "cutoff_len": args.seq_len}


def vl_step_batches(config, layout, stage, bundle):
    """A step function over megatune's own data pipeline for a vision-language shape: each call
    returns (this rank's collated micro-batches of the next global batch, model FLOPs per GPU,
    real tokens per GPU), the FLOPs by the model provider's formula (decoder + vision tower)."""
    from transformers import AutoTokenizer

    from megatune.data.collator import pad_multiple_for
    from megatune.data.source import build_train_source, rank_share
    from megatune.engine.step import micro_batches
    from megatron.core import parallel_state as ps

    tokenizer = AutoTokenizer.from_pretrained(config.model.model_name_or_path)
    stage.prepare_tokenizer(config, tokenizer)
    source = build_train_source(config, tokenizer, layout.global_batch_size)[0]
    pad_multiple = pad_multiple_for(layout.tp, layout.cp, config.parallel.sequence_parallel)

    def step_batches() -> tuple[list, float, float]:
        global_batch = source.next_global_batch()
        share = rank_share(global_batch, ps.get_data_parallel_rank(), layout.dp)
        batches = micro_batches(stage, share, layout.micro_batch_size, tokenizer.pad_token_id, pad_multiple, False)
        doc_lens = [n for sample in global_batch for n in sample.doc_lens]
        grids = [g for sample in global_batch for g in sample.image_grid_thw]
        return batches, bundle.step_flops(doc_lens, grids) / layout.world_size, sum(doc_lens) / layout.world_size

    return step_batches


def run_megatune(args) -> dict:
    import torch

    from megatune.config import derive_layout, load_config
    from megatune.data.collator import Batch, collate
    from megatune.data.processors import Sample
    from megatune.distributed import init_distributed
    from megatune.engine import optim
    from megatune.engine.metrics import peak_memory_gb
    from megatune.engine.step import train_step
    from megatune.stages import get_stage
    from megatune.models import build
    from megatune.models.weights import load_hf_weights

    fast = args.path.startswith("fast")
    compiled_norm_rope = args.path == "fast"  # fast-nocompile: the rest of the fast path, eager norm/rope
    overrides = {
        "model_name_or_path": args.model_dir,
        "stage": "pt",
        "bf16": True,
        "per_device_train_batch_size": args.micro_batch,
        "gradient_accumulation_steps": args.grad_accum,
        "learning_rate": 1e-5,
        "output_dir": "/tmp/throughput_unused",
        # the fast path's switches (all on by default on GPU)
        "apply_rope_fusion": compiled_norm_rope,
        "persist_layer_norm": compiled_norm_rope,
        "gradient_accumulation_fusion": fast,
        "cross_entropy_loss_fusion": fast,
    }
    vl = VL_SHAPE.match(args.shape) is not None
    if vl:  # real multimodal batches from the data pipeline (ensure_model wrote the dataset)
        overrides.update(vl_overrides(args))
    overrides.update(args.overrides)
    config = load_config(None, overrides)
    layout = derive_layout(config, int(os.environ.get("WORLD_SIZE", "1")))
    init_distributed(layout, seed=0)  # installs the fast path's kernels on CUDA (layers/fused.py)
    installed = []
    if fast and torch.cuda.is_available():
        from megatune.layers.fused import enable_fast_path

        installed = enable_fast_path()  # idempotent: reports what is installed
    if args.no_fused_adam:
        optim.use_fused_adam = lambda optimizer: 0
    memory = {}  # GB allocated after each start-up stage, and each warm-up step's peak

    def mark(name: str) -> None:
        if torch.cuda.is_available():
            memory[name] = round(torch.cuda.memory_allocated() / 1024**3, 2)

    bundle = build.build_model(config, args.model_dir)
    load_hf_weights(bundle, args.model_dir)
    mark("model")
    if fast and args.ce_chunk:
        from megatune.layers.cross_entropy import use_fused_linear_cross_entropy

        for chunk in bundle.chunks:
            chunk._megatune_fused_ce = False  # re-wrap with this run's chunk size
            use_fused_linear_cross_entropy(chunk, args.ce_chunk, vocab_size=bundle.vocab_size
                                           if bundle.padded_vocab_size != bundle.vocab_size else None)
    model = optim.wrap_ddp(bundle.chunks, bundle.config, config)
    mark("ddp_grad_buffers")
    optimizer = optim.build_optimizer(model, bundle.config, config)
    mark("optimizer")

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    stage = get_stage(config)
    if vl:
        step_batches = vl_step_batches(config, layout, stage, bundle)
    else:
        vocab = bundle.provider.vocab_size(bundle.hf)
        gen = torch.Generator().manual_seed(0)
        # Every data-parallel rank runs grad_accum micro-batches; model FLOPs per GPU divide the
        # global batch's FLOPs by the world size (as engine/metrics.py does).
        global_tokens = args.micro_batch * args.grad_accum * layout.dp
        text_flops = bundle.step_flops([args.seq_len] * global_tokens) / layout.world_size

        def step_batches() -> tuple[list, float, float]:
            """(this rank's micro-batches, model FLOPs per GPU, tokens per GPU) of one step."""
            batches = []
            for _ in range(args.grad_accum):
                rows = [torch.randint(0, vocab, (args.seq_len,), generator=gen).tolist() for _ in range(args.micro_batch)]
                b = collate([Sample(r, r) for r in rows], pad_id=0)
                if fast:  # staged on the GPU before the step: the schedule's .to(device) is then a no-op
                    b = Batch(b.tokens.to(dev), b.labels.to(dev), b.position_ids.to(dev), None, b.lengths)
                batches.append(b)
            return batches, text_flops, global_tokens * args.seq_len / layout.world_size

    times, losses, flops, tokens = [], [], [], []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    snapshot = None
    for step in range(args.warmup + args.steps):
        batches, step_flops, step_tokens = step_batches()
        sync()
        record = args.memory_snapshot and step == 1 and torch.cuda.is_available()
        if record:  # the second step: Adam's states exist, as in every later step
            torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        start = time.perf_counter()
        result = train_step(stage, bundle.provider, model, optimizer, batches)
        sync()
        if record:
            snapshot = transient_at_peak(torch.cuda.memory._snapshot())
            torch.cuda.memory._record_memory_history(enabled=None)
        times.append(time.perf_counter() - start)
        flops.append(step_flops)
        tokens.append(step_tokens)
        losses.append(result.loss)
        if step < 2 and torch.cuda.is_available():
            memory[f"step{step + 1}_peak"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
            mark(f"after_step{step + 1}")
    prof_out = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        batches_list = [step_batches()[0] for _ in range(2)]
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for batches in batches_list:
                train_step(stage, bundle.provider, model, optimizer, batches)
            sync()
            wall_us = (time.perf_counter() - t0) * 1e6
        prof_out = breakdown(prof, wall_us)
    cprof = None
    if args.cprofile:
        import cProfile
        import io
        import pstats

        batches = step_batches()[0]
        sync()
        pr = cProfile.Profile()
        pr.enable()
        train_step(stage, bundle.provider, model, optimizer, batches)
        sync()
        pr.disable()
        buf = io.StringIO()
        stats = pstats.Stats(pr, stream=buf)
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumulative").print_stats(45)
        cprof = buf.getvalue()
        print(cprof, file=sys.stderr)
    timed = times[args.warmup:]
    step_s = sum(timed) / len(timed)
    tflops = sum(flops[args.warmup:]) / sum(timed) / 1e12
    peak = peak_memory_gb()
    if layout.world_size > 1:  # the largest rank's peak
        import torch.distributed as dist

        t = torch.tensor([peak], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = t.item()
    return {
        "run": f"megatune {args.path}",
        "layout": {k: getattr(layout, k) for k in ("world_size", "tp", "pp", "ep", "dp")},
        "overrides": args.overrides,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "CUDA_DEVICE_MAX"))},
        "shape": args.shape,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "fast_path_installed": installed,
        "step_s": step_s,
        "step_s_min": min(timed),
        "step_s_max": max(timed),
        "tokens_per_s_per_gpu": sum(tokens[args.warmup:]) / sum(timed),
        "tflops_per_gpu": tflops,
        "mfu": tflops / PEAK_TFLOPS,
        "peak_mem_gb": peak,
        "memory_gb": memory,
        "memory_snapshot": snapshot,
        "losses": [round(x, 5) for x in losses],
        "flop_formula": FLOP_FORMULA + (VL_FLOPS if vl else ""),
        "profile": prof_out,
        "cprofile": cprof,
    }


def run_hf(args, precision: str) -> dict:
    if VL_SHAPE.match(args.shape):  # transformers' Qwen2-VL on megatune's batches of the same config
        import tempfile

        import yaml

        values = {"model_name_or_path": args.model_dir, "per_device_train_batch_size": args.micro_batch,
                  "gradient_accumulation_steps": args.grad_accum, **vl_overrides(args)}
        config_file = Path(tempfile.mkdtemp()) / "vl_baseline.yaml"
        config_file.write_text(yaml.safe_dump(values))
        cmd = [sys.executable, str(HERE / "hf_vl_train_baseline.py"), str(config_file), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--precision", precision]
    else:
        cmd = [sys.executable, str(HERE / "hf_train_baseline.py"), "--model_dir", args.model_dir, "--seq_len",
               str(args.seq_len), "--micro_batch", str(args.micro_batch), "--grad_accum", str(args.grad_accum),
               "--steps", str(args.warmup + args.steps), "--warmup", str(args.warmup), "--precision", precision]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not line:
        return {"run": f"transformers {precision}", "error": out.stderr[-3000:]}
    row = json.loads(line[-1])
    return {
        "run": f"transformers {precision}",
        "shape": args.shape,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "step_s": row["step_s"],
        "tokens_per_s_per_gpu": row["tokens_per_s"],
        "tflops_per_gpu": row["tflops_per_gpu"],
        "mfu": row["tflops_per_gpu"] / PEAK_TFLOPS,
        "peak_mem_gb": row["peak_mem_gb"],
        "flop_formula": FLOP_FORMULA + (VL_FLOPS if VL_SHAPE.match(args.shape) else ""),
    }


def emit(row: dict, out: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-1.7b")
    parser.add_argument("--model_dir", default=None, help="default: /tmp/<shape>")
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--grad_accum", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--paths", nargs="*", default=["plain", "fast"], choices=["plain", "fast", "fast-nocompile"])
    parser.add_argument("--baseline", nargs="*", default=[], help="'hf' runs transformers amp and bf16; 'hf_amp' or 'hf_bf16' one of them")
    parser.add_argument("--profile", nargs="*", default=[], help="paths to profile (2 extra steps)")
    parser.add_argument("--cprofile", nargs="*", default=[], help="paths to run one step under cProfile")
    parser.add_argument("--ce_chunk", type=int, default=2048)
    parser.add_argument("--image_size", type=int, default=512, help="vision-language shapes: the square image's side (pixels)")
    parser.add_argument("--no_fused_adam", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--memory_snapshot", action="store_true",
                        help="record the second step's allocations; report those alive at its peak")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (torch.distributed.run, one host)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="megatune config keys for the megatune paths, e.g. tensor_model_parallel_size=2")
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    args.model_dir = args.model_dir or f"/tmp/{args.shape}"
    import yaml

    args.overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.path:  # child
        args.profile = args.path in args.profile
        args.cprofile = args.path in args.cprofile
        row = run_megatune(args)
        if int(os.environ.get("RANK", "0")) == 0:
            emit(row, None)
        return
    ensure_model(args.shape, args.model_dir, args.image_size)
    for precision in ("amp", "bf16"):
        if "hf" in args.baseline or f"hf_{precision}" in args.baseline:
            emit(run_hf(args, precision), args.out)
    for path in args.paths:
        launcher = [sys.executable]
        if args.gpus > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
        cmd = launcher + [__file__, "--path", path] + [a for a in sys.argv[1:]]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        rows = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not rows:
            emit({"run": f"megatune {path}", "error": (proc.stdout[-2000:] + proc.stderr[-4000:])}, args.out)
        else:
            row = json.loads(rows[-1])
            if row.get("cprofile"):
                print(row.pop("cprofile"), file=sys.stderr)
            emit(row, args.out)


if __name__ == "__main__":
    main()
