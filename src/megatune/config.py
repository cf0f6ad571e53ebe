"""Typed run configuration: LLaMA-Factory YAML keys plus Megatron parallelism keys.

One flat namespace of keys (as in LLaMA-Factory YAML files), grouped into sections for
readability. `load_config` reads a YAML file, applies `--key value` overrides and type-checks
every value; `validate` checks the layout against the world size and the model before any heavy
work starts. Problems are collected and reported together, one line each.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(Exception):
    """One or more configuration problems; `str()` gives one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class ModelSection:
    model_name_or_path: Optional[str] = None
    trust_remote_code: bool = False  # accepted for compatibility; custom code is never executed


@dataclass
class DataSection:
    dataset: Optional[str] = None
    eval_dataset: Optional[str] = None
    dataset_dir: str = "data"
    template: Optional[str] = None
    cutoff_len: int = 2048
    max_samples: Optional[int] = None
    overwrite_cache: bool = False
    preprocessing_num_workers: Optional[int] = None
    packing: Optional[bool] = None
    neat_packing: bool = False
    train_on_prompt: bool = False
    mask_history: bool = False
    val_size: float = 0.0
    mix_strategy: str = "concat"
    interleave_probs: Optional[str] = None
    streaming: bool = False
    tokenized_path: Optional[str] = None
    enable_thinking: bool = True
    skip_invalid: bool = False
    image_max_pixels: int = 768 * 768  # images are shrunk to at most this many pixels (LLaMA-Factory's rule)
    image_min_pixels: int = 32 * 32  # and grown to at least this many


@dataclass
class TrainingSection:
    stage: str = "sft"
    do_train: bool = True
    finetuning_type: str = "full"
    output_dir: str = "output"
    overwrite_output_dir: bool = False
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    min_lr: float = 0.0
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    eval_steps: Optional[int] = None
    eval_strategy: str = "no"
    bf16: bool = False
    fp16: bool = False
    seed: int = 42
    resume_from_checkpoint: Optional[str] = None
    report_to: str = "none"  # none, all, or a list of: tensorboard, wandb, swanlab
    run_name: Optional[str] = None  # the run's name in wandb / swanlab
    swanlab_project: Optional[str] = None  # SwanLab project (report_to: swanlab); default megatune
    swanlab_mode: Optional[str] = None  # SwanLab mode (cloud, local, offline, disabled); default SwanLab's
    plot_loss: bool = False
    max_nonfinite_steps: int = 5  # stop after this many steps in a row with a non-finite loss/grad
    ddp_timeout: int = 1800
    # stage: dpo (LLaMA-Factory's keys and defaults; stages/preference_loss.py)
    pref_beta: float = 0.1
    pref_loss: str = "sigmoid"
    pref_ftx: float = 0.0
    dpo_label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    ref_model: Optional[str] = None  # reference checkpoint folder; None: the initial policy
    # vision-language models (LLaMA-Factory's keys): frozen parts get no gradients or optimizer state
    freeze_vision_tower: bool = False
    freeze_multi_modal_projector: bool = False
    freeze_language_model: bool = False


@dataclass
class ParallelSection:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    ddp_bucket_size: Optional[int] = None
    moe_grouped_gemm: bool = True
    moe_token_dispatcher_type: str = "alltoall"
    moe_aux_loss_coeff: Optional[float] = None
    moe_expert_capacity_factor: Optional[float] = None  # None: no token dropping
    moe_token_drop_policy: str = "probs"
    moe_pad_expert_input_to_capacity: bool = False
    moe_log_load: bool = False  # log each MoE layer's share of tokens per expert in trainer_log.jsonl
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # GPU fast path (layers/fused.py, layers/cross_entropy.py); on CPU the plain formulas run
    bias_activation_fusion: bool = True  # SwiGLU: Megatron's compiled kernel
    apply_rope_fusion: bool = True  # RoPE: torch.compile'd
    persist_layer_norm: bool = True  # RMSNorm (and q/k norm): torch.compile'd
    gradient_accumulation_fusion: bool = True  # weight grads added straight into the fp32 main_grad
    cross_entropy_loss_fusion: bool = True  # chunked output-layer + cross-entropy, no full fp32 logits
    transformer_impl: str = "local"  # layer implementation: local (torch-native, tested) or transformer_engine
    make_vocab_size_divisible_by: Optional[int] = None  # pad the vocabulary to a multiple of this x TP (Megatron's rule); null: by 128, only when TP does not divide it
    nproc_per_node: int = 1


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "training": TrainingSection,
    "parallel": ParallelSection,
}

# Keys of LLaMA-Factory / mcore_adapter / the HF Trainer that are not fields here (aliases, no-ops,
# refusals with the reason) live in config_keys.py.

CHOICES = {
    "stage": ("pt", "sft", "dpo"),
    "pref_loss": ("sigmoid", "hinge", "ipo", "orpo", "simpo"),
    "finetuning_type": ("full",),
    "lr_scheduler_type": ("constant", "constant_with_warmup", "linear", "cosine"),
    "mix_strategy": ("concat", "interleave_under", "interleave_over"),
    "moe_token_dispatcher_type": ("alltoall", "allgather"),
    "moe_token_drop_policy": ("probs", "position"),
    "recompute_granularity": (None, "full", "selective"),
    "recompute_method": (None, "uniform", "block"),
    "eval_strategy": ("no", "steps", "epoch"),
    "transformer_impl": ("local", "transformer_engine"),
}


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    source: Optional[str] = None  # the YAML file it came from, for messages
    notes: list = field(default_factory=list)  # start-up lines (defaults filled in, no-op keys)

    def to_flat_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_flat_dict(), sort_keys=False))


def _key_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            index[f.name] = (section, f)
    return index


KEYS = _key_index()


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ValueError."""
    hint = typing.get_type_hints(SECTIONS[KEYS[key][0]])[key]
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none", "")):
        if optional:
            return None
        raise ValueError("must not be empty")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (list, tuple)):  # LLaMA-Factory allows dataset lists
            return ",".join(str(v) for v in value)
        return str(value)
    return value


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`--key value` / `--key=value` pairs into a dict; a bare `--flag` means true."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError([f"unexpected argument {arg!r}: options are written --key value"])
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 1
        else:
            value = "true"
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _unknown_key_message(key: str, where: str) -> str:
    from megatune.config_keys import ALIASES, NOOP, NOOP_VALUES, REFUSED

    known = [*KEYS, *ALIASES, *NOOP, *NOOP_VALUES, *REFUSED]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    hint = f"; did you mean '{close[0]}'?" if close else " (docs/config.md lists every key megatune knows)"
    return f"{where}: unknown key '{key}'{hint}"


def _translate_keys(values: dict[str, Any], where: dict[str, str], notes: list[str]) -> list[str]:
    """Keys of LLaMA-Factory, mcore_adapter and the HF Trainer that are not config fields:
    aliases are renamed in place, no-ops dropped (noted), refused keys reported."""
    from megatune.config_keys import classify

    problems, noops = [], []
    for key in list(values):
        status, text = classify(key, values[key], set(KEYS))
        if status == "honoured":
            continue
        value = values.pop(key)
        if status == "alias":
            if text in values:
                problems.append(f"{where[key]}: '{key}' and '{text}' are the same setting; keep one")
            else:
                values[text], where[text] = value, where[key]
        elif status == "noop":
            noops.append(f"{key} ({text})")
        elif status == "refused":
            problems.append(f"{where[key]}: key '{key}' is not supported: {text}")
        elif status == "unknown":
            problems.append(_unknown_key_message(key, where[key]))
    if noops:
        notes.append("accepted, no effect here: " + "; ".join(noops))
    return problems


def build_config(values: dict[str, Any], where: dict[str, str]) -> Config:
    """Type-check every key (collecting all problems) and return the Config."""
    values, where, notes = dict(values), dict(where), []
    gc = values.pop("gradient_checkpointing", None)  # HF's switch: recompute every layer
    use_swanlab = values.pop("use_swanlab", None)  # LLaMA-Factory's switch: report to SwanLab too
    problems = _translate_keys(values, where, notes)
    sections = {name: {} for name in SECTIONS}
    for key, value in values.items():
        section, f = KEYS[key]
        try:
            value = _coerce(key, f.type, value)
        except ValueError as err:
            problems.append(f"{where[key]}: key '{key}' {err}")
            continue
        if key in CHOICES and value not in CHOICES[key]:
            allowed = ", ".join(str(c) for c in CHOICES[key] if c is not None)
            problems.append(f"{where[key]}: {key}={value!r} is not supported; choose one of: {allowed}")
            continue
        sections[section][key] = value
    if problems:
        raise ConfigError(problems)
    config = Config(**{name: SECTIONS[name](**kw) for name, kw in sections.items()})
    config.notes.extend(notes)
    if gc is not None and str(gc).lower() in ("true", "1", "yes") and config.parallel.recompute_granularity is None:
        config.parallel.recompute_granularity = "full"  # same meaning: every layer's activations recomputed
    _fill_recompute_defaults(config)
    if use_swanlab is not None and str(use_swanlab).lower() in ("true", "1", "yes"):
        names = [n.strip() for n in config.training.report_to.split(",") if n.strip() not in ("", "none")]
        config.training.report_to = ",".join(names + ([] if "swanlab" in names else ["swanlab"]))
    return config


def _fill_recompute_defaults(config: Config) -> None:
    """`recompute_granularity: full` alone means "recompute every layer", as in mcore_adapter
    (LLaMA-Factory's Megatron examples set only the granularity); Megatron itself insists on a
    method and a layer count, so fill in the ones that mean exactly that."""
    p = config.parallel
    if p.recompute_granularity != "full":
        return
    filled = []
    if p.recompute_method is None:
        p.recompute_method = "uniform"
        filled.append("recompute_method: uniform")
    if p.recompute_num_layers is None:
        p.recompute_num_layers = 1
        filled.append("recompute_num_layers: 1")
    if filled:
        config.notes.append(f"recompute_granularity: full: using {', '.join(filled)} (every layer recomputed, "
                            "as mcore_adapter does); set them to recompute fewer layers")


def load_config(yaml_path: Optional[str] = None, overrides: Optional[dict[str, Any]] = None) -> Config:
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError([f"config file {yaml_path} does not exist"])
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError([f"{yaml_path}: not valid YAML: {err}"]) from None
        if not isinstance(loaded, dict):
            raise ConfigError([f"{yaml_path}: expected a mapping of key: value at the top level"])
        for key, value in loaded.items():
            values[key] = value
            where[key] = str(yaml_path)
    for key, value in (overrides or {}).items():
        values[key] = value
        where[key] = "command line"
    config = build_config(values, where)
    config.source = yaml_path
    return config


@dataclass(frozen=True)
class Layout:
    """Derived sizes, computed in one place with Megatron's rules."""

    world_size: int
    tp: int
    pp: int
    vpp: Optional[int]
    cp: int
    ep: int
    etp: int
    dp: int
    expert_dp: int
    micro_batch_size: int
    num_micro_batches: int
    global_batch_size: int

    def describe(self, with_batch: bool = True) -> str:
        """The layout line printed at start; `with_batch` adds the global-batch arithmetic
        (training only: export and verify have no batch)."""
        line = (f"world={self.world_size} tp={self.tp} pp={self.pp} cp={self.cp} ep={self.ep} "
                f"etp={self.etp} -> data-parallel size {self.dp}")
        if not with_batch:
            return line
        return (f"{line}; global batch = {self.micro_batch_size} (micro) x {self.num_micro_batches} "
                f"(grad accum) x {self.dp} (dp) = {self.global_batch_size} sequences per step")


def derive_layout(config: Config, world_size: int) -> Layout:
    """Megatron's rule: dp = world / (tp * pp * cp); expert parallelism does not shrink it."""
    p, t = config.parallel, config.training
    tp, pp, cp, ep = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
        p.expert_model_parallel_size,
    )
    etp = p.expert_tensor_parallel_size or tp
    dp = world_size // (tp * pp * cp)
    return Layout(
        world_size=world_size,
        tp=tp,
        pp=pp,
        vpp=p.virtual_pipeline_model_parallel_size,
        cp=cp,
        ep=ep,
        etp=etp,
        dp=dp,
        expert_dp=world_size // (ep * etp * pp),
        micro_batch_size=t.per_device_train_batch_size,
        num_micro_batches=t.gradient_accumulation_steps,
        global_batch_size=t.per_device_train_batch_size * t.gradient_accumulation_steps * dp,
    )


def validate(config: Config, world_size: int, hf_config: Optional[dict] = None) -> Layout:
    """Check everything that can be checked before heavy work; raise ConfigError listing all."""
    p = config.parallel
    problems = []
    for key in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "context_parallel_size",
        "expert_model_parallel_size",
        "nproc_per_node",
    ):
        if getattr(p, key) < 1:
            problems.append(f"{key}={getattr(p, key)} must be at least 1")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(config.training, key) < 1:
            problems.append(f"{key}={getattr(config.training, key)} must be at least 1")
    if problems:
        raise ConfigError(problems)

    layout = derive_layout(config, world_size)
    tp, pp, cp, ep, etp = layout.tp, layout.pp, layout.cp, layout.ep, layout.etp
    if world_size % (tp * pp * cp):
        problems.append(
            f"world size {world_size} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size x context_parallel_size = {tp}x{pp}x{cp} = {tp * pp * cp}"
            + _nproc_hint(world_size, tp * pp * cp)
        )
    elif world_size % (ep * etp * pp):
        problems.append(
            f"world size {world_size} is not divisible by expert_model_parallel_size x "
            f"expert_tensor_parallel_size x pipeline_model_parallel_size = {ep}x{etp}x{pp}"
            + _nproc_hint(world_size, math.lcm(tp * pp * cp, ep * etp * pp))
        )
    if p.make_vocab_size_divisible_by is not None and p.make_vocab_size_divisible_by < 1:
        problems.append(f"make_vocab_size_divisible_by={p.make_vocab_size_divisible_by} must be at least 1 "
                        "(or null: pad only when tensor_model_parallel_size does not divide the vocabulary)")
    if p.sequence_parallel and tp == 1:
        problems.append("sequence_parallel: true needs tensor_model_parallel_size > 1")
    if p.virtual_pipeline_model_parallel_size is not None and pp == 1:
        problems.append("virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1")
    if p.transformer_impl == "transformer_engine":
        from megatune.layers.spec import te_importable

        if not te_importable():
            problems.append("transformer_impl: transformer_engine needs Transformer Engine and a GPU, and this "
                            "machine has no importable transformer_engine; use transformer_impl: local")
        elif hf_config is not None and _is_moe(hf_config):
            problems.append("transformer_impl: transformer_engine is refused for MoE models: megatune has no "
                            "mapping for Transformer Engine's grouped expert weights; use transformer_impl: local")
    if config.training.bf16 and config.training.fp16:
        problems.append("bf16 and fp16 are both true; choose one")
    path = config.model.model_name_or_path
    if path is not None and not Path(path).is_dir():
        problems.append(
            f"model_name_or_path: folder {path} does not exist (megatune loads local Hugging Face "
            "checkpoints only; download the model first)"
        )
    if config.training.stage == "dpo":
        problems += _preference_problems(config)
    d = config.data
    if not 0 < d.image_min_pixels <= d.image_max_pixels:
        problems.append(f"image_min_pixels={d.image_min_pixels} and image_max_pixels={d.image_max_pixels} must "
                        "satisfy 0 < image_min_pixels <= image_max_pixels")
    if hf_config is not None:
        problems += _model_problems(config, hf_config)
    if problems:
        raise ConfigError(problems)
    return layout


def _nproc_hint(world_size: int, unit: int) -> str:
    """What to start instead: the nearest multiple of `unit` processes at or above the world
    size (on one machine, `--nproc_per_node`; under torchrun, its own process count)."""
    suggested = max(unit, -(-world_size // unit) * unit)
    if "WORLD_SIZE" in os.environ:
        return f"; start a multiple of {unit} processes (e.g. torchrun --nproc_per_node {suggested})"
    return f"; start {suggested} processes with --nproc_per_node {suggested}"


def _preference_problems(config: Config) -> list[str]:
    """stage: dpo keys (stages/preference_loss.py checks their values), no packing, a reference
    folder that exists."""
    from megatune.stages.dpo import preference_config
    from megatune.stages.preference_loss import validate_preference_config

    problems = []
    try:
        validate_preference_config(preference_config(config))
    except ValueError as err:
        problems += str(err).splitlines()
    if config.data.packing:
        problems.append("packing: true is not supported with stage: dpo (each pair is its own sample); set packing: false")
    ref = config.training.ref_model
    if ref is not None and not Path(ref).is_dir():
        problems.append(f"ref_model: folder {ref} does not exist (a local Hugging Face checkpoint of the same architecture)")
    return problems


def _is_moe(hf: dict) -> bool:
    from megatune.models import UnsupportedModelError, get_provider

    try:
        return get_provider(hf).is_moe(hf)
    except UnsupportedModelError:
        return False


def _model_problems(config: Config, hf: dict) -> list[str]:
    """The model family's own checks: is the checkpoint supported, does the layout divide it."""
    from megatune.models import UnsupportedModelError, get_provider

    where = f"{config.model.model_name_or_path}/config.json"
    try:
        provider = get_provider(hf, where)
    except UnsupportedModelError as err:
        return [str(err)]
    problems = provider.layout_problems(hf, config.parallel)
    if not provider.accepts_images:
        frozen = [k for k in ("freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model")
                  if getattr(config.training, k)]
        problems += [f"{k}: true needs a vision-language model; {hf.get('model_type')} has no vision tower" for k in frozen]
    return problems


def read_hf_config(model_dir: str) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError([f"model_name_or_path: {model_dir} has no config.json; is it a Hugging Face model folder?"])
    return json.loads(path.read_text())
