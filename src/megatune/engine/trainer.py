"""`megatune train`: the training loop around Megatron's schedules, with resume and HF export.

Order of events: data (rank 0 first, so the others hit the datasets cache) -> model from the HF
checkpoint -> Megatron DDP + distributed optimizer + LR schedule -> optional resume -> steps
(log, evaluate, save, stop on signal) -> HF export into output_dir.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatune.config import Config, ConfigError, Layout
from megatune.data.collator import pad_multiple_for
from megatune.data.processors import IGNORE, Sample
from megatune.data.source import rank_share
from megatune.engine import checkpoint as ckpt
from megatune.engine.metrics import ExpertLoad, MetricsLog, Throughput, format_row, moe_aux_loss, peak_memory_gb, plot_loss
from megatune.engine.optim import build_optimizer, build_scheduler, schedule_problems, wrap_ddp
from megatune.data.pipeline import apply_config_template_eos
from megatune.models.hf_io import save_tokenizer
from megatune.engine.step import evaluate, micro_batches, train_step, uniform_length


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss keeps being non-finite); the message says why."""


@dataclass
class StopFlag:
    """Set by SIGTERM/SIGINT; acted on at the next step boundary on every rank together."""

    signum: int | None = None
    previous: dict = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop now, without saving
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _say(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"megatune: {message}", flush=True)


@contextlib.contextmanager
def synced_params(model: list):
    """With overlap_param_gather the updated parameters arrive lazily in the next forward; force
    them in before anything reads the weights (eval, save, export)."""
    lazy = model[0].ddp_config.overlap_param_gather
    if lazy:
        for chunk in model:
            chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        if lazy:
            for chunk in model:
                chunk.enable_forward_pre_hook()


def _prepare_output_dir(config: Config) -> None:
    out = Path(config.training.output_dir)
    existing = ckpt.checkpoint_steps(out)
    if existing and config.training.resume_from_checkpoint is None:
        if not config.training.overwrite_output_dir:
            raise ConfigError([
                f"output_dir {out} already holds checkpoints {existing}; set resume_from_checkpoint: auto "
                "to continue that run, or overwrite_output_dir: true to start over (deletes them)"
            ])
        if dist.get_rank() == 0:
            for step in existing:
                shutil.rmtree(out / f"checkpoint-{step}")
            (out / "trainer_log.jsonl").unlink(missing_ok=True)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()


def _build_data(config: Config, tokenizer, layout: Layout):
    from megatune.data.pipeline import build_train_source

    source = evals = stats = None
    for turn in (0, 1):  # rank 0 encodes first and fills the cache; the others then read it
        if (dist.get_rank() == 0) == (turn == 0):
            if turn == 1 and config.data.overwrite_cache:  # rank 0 has just rewritten it
                config = replace(config, data=replace(config.data, overwrite_cache=False))
            source, evals, stats = build_train_source(config, tokenizer, layout.global_batch_size)
        dist.barrier()
    return source, evals, stats


def total_steps(config: Config, steps_per_epoch: int | None) -> int:
    t = config.training
    if t.max_steps > 0:
        return t.max_steps
    if steps_per_epoch is None:
        raise ConfigError(["streaming data has no known length: set max_steps"])
    return max(1, math.ceil(t.num_train_epochs * steps_per_epoch))


def _eval_every(config: Config, steps_per_epoch: int | None) -> int | None:
    t = config.training
    if t.eval_strategy == "epoch":
        return steps_per_epoch
    if t.eval_steps:
        return t.eval_steps
    return t.logging_steps if t.eval_strategy == "steps" else None


def _eval_batches(evals: list[Sample], config: Config, layout: Layout, pad_id: int, pad_multiple: int):
    """This rank's evaluation micro-batches; ranks short of samples get a fully masked one."""
    mine = evals[ps.get_data_parallel_rank()::layout.dp]
    if not mine:
        mine = [Sample([pad_id], [IGNORE])]
    mbs, packed = config.training.per_device_eval_batch_size, bool(config.data.packing)
    length = uniform_length(evals, mbs, pad_multiple, packed) if _needs_uniform_length(layout) else None
    return [micro_batches(mine, mbs, pad_id, pad_multiple, packed, length)]


def _needs_uniform_length(layout: Layout) -> bool:
    """Pipeline parallelism and expert parallelism need one micro-batch shape per step."""
    return layout.pp > 1 or layout.ep > 1


def _check_run_keys(config: Config) -> None:
    t = config.training
    problems = [f"{key}={getattr(t, key)} must be at least 1" for key in ("logging_steps", "save_steps", "max_nonfinite_steps")
                if getattr(t, key) < 1]
    if not t.do_train:
        problems.append("do_train: false — `megatune train` only trains; remove the key or set it true")
    if problems:
        raise ConfigError(problems)


def train(config: Config, layout: Layout) -> int:
    from transformers import AutoTokenizer

    from megatune.models.build import build_model, param_dtype
    from megatune.models.weights import export_hf, load_hf_weights

    t, model_dir = config.training, config.model.model_name_or_path
    _check_run_keys(config)
    _prepare_output_dir(config)
    resume = ckpt.resolve_resume(t.resume_from_checkpoint, t.output_dir)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos_note = apply_config_template_eos(config, tokenizer)
    if eos_note:
        _say(eos_note)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    source, evals, stats = _build_data(config, tokenizer, layout)
    steps = total_steps(config, source.steps_per_epoch)
    if schedule_problems(config, steps):
        raise ConfigError(schedule_problems(config, steps))
    _say(f"data: {stats.line()}; {source.steps_per_epoch or 'unknown'} steps per epoch, training {steps} steps")

    bundle = build_model(config, model_dir)
    if resume is None:
        load_hf_weights(bundle, model_dir)
    model = wrap_ddp(bundle.chunks, bundle.config, config)
    optimizer = build_optimizer(model, bundle.config, config)
    scheduler = build_scheduler(optimizer, config, steps)
    state = ckpt.TrainerState()
    if resume is not None:
        saved = ckpt.load_checkpoint(resume, bundle.chunks, optimizer, scheduler)
        source.load_state_dict(saved["data"])
        state = ckpt.TrainerState(saved["step"], saved["skipped_steps"], saved["consumed_samples"])
        _say(f"resumed from {resume} at step {state.step}")

    log = MetricsLog(t.output_dir, t.report_to, state.step) if dist.get_rank() == 0 else None
    stop = StopFlag()
    stop.install()
    try:
        stopped = _loop(config, layout, bundle, model, optimizer, scheduler, source, evals, state, steps, pad_id, log,
                        stop, tokenizer, bool(eos_note))
    finally:
        stop.restore()
        if log is not None:
            log.close()
    if stopped is not None:
        _say(f"stopped by signal {stopped} at step {state.step}; checkpoint saved. Continue with "
             f"--resume_from_checkpoint auto --output_dir {t.output_dir}")
        return 128 + stopped
    with synced_params(model):
        export_hf(bundle, model_dir, t.output_dir, param_dtype(config))
    if dist.get_rank() == 0:
        if eos_note:
            save_tokenizer(tokenizer, Path(t.output_dir))
        if t.plot_loss:
            problem = plot_loss(log.rows(), Path(t.output_dir) / "training_loss.png")
            if problem:
                print(f"megatune: {problem}", file=sys.stderr)
        print(f"megatune: done: {state.step} steps ({state.skipped_steps} skipped); Hugging Face "
              f"checkpoint written to {t.output_dir}", flush=True)
    return 0


def _loop(config, layout, bundle, model, optimizer, scheduler, source, evals, state, steps, pad_id, log, stop,
          tokenizer=None, eos_replaced=False):
    """Run steps until done; returns the signal number if a signal stopped training, else None."""
    t = config.training
    pad_multiple = pad_multiple_for(layout.tp, layout.cp, config.parallel.sequence_parallel)
    packed = bool(config.data.packing)
    uniform = _needs_uniform_length(layout)
    eval_every = _eval_every(config, source.steps_per_epoch) if evals else None
    throughput = Throughput(bundle.hf, layout.world_size)
    load = ExpertLoad(bundle.chunks) if config.parallel.moe_log_load and bundle.config.num_moe_experts else None
    window_loss = window_tokens = 0.0
    window_aux: list[float] = []  # MoE load-balancing loss of each step since the last row
    nonfinite_in_row = 0
    last_grad_norm = None
    progress = _progress(state.step, steps)
    started = time.perf_counter()
    first_step = state.step
    while state.step < steps:
        global_batch = source.next_global_batch()
        share = rank_share(global_batch, ps.get_data_parallel_rank(), layout.dp)
        lr = scheduler.get_lr(optimizer.param_groups[0])  # the rate this step uses
        length = uniform_length(global_batch, layout.micro_batch_size, pad_multiple, packed) if uniform else None
        batches = micro_batches(share, layout.micro_batch_size, pad_id, pad_multiple, packed, length)
        result = train_step(model, optimizer, batches)
        scheduler.step(increment=1)
        aux = moe_aux_loss(len(batches))
        if aux is not None:
            window_aux.append(aux)
        state.step += 1
        state.consumed_samples += len(global_batch)
        throughput.add([n for s in global_batch for n in s.doc_lens])
        if result.skipped:
            state.skipped_steps += 1
            nonfinite_in_row += 1
            _say(f"step {state.step}: loss {result.loss} or gradients not finite; update skipped "
                 f"({nonfinite_in_row} in a row)")
            if nonfinite_in_row >= t.max_nonfinite_steps:
                raise TrainingError(
                    f"{nonfinite_in_row} steps in a row had a non-finite loss or gradient (last at step "
                    f"{state.step}); stopping. Lower learning_rate, check the data, or raise max_nonfinite_steps"
                )
        else:
            nonfinite_in_row = 0
            window_loss += result.loss * result.tokens
            window_tokens += result.tokens
            last_grad_norm = result.grad_norm
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{result.loss:.4f}")
        row = None
        if state.step % t.logging_steps == 0 or state.step == steps:
            elapsed = time.perf_counter() - started
            row = {
                "step": state.step,
                "total_steps": steps,
                "epoch": state.step / source.steps_per_epoch if source.steps_per_epoch else None,
                "loss": window_loss / window_tokens if window_tokens else math.nan,
                **({"aux_loss": sum(window_aux) / len(window_aux)} if window_aux else {}),
                **({"expert_load": load.report(bundle.config.num_layers, bundle.config.num_moe_experts)} if load else {}),
                "lr": lr,
                "grad_norm": last_grad_norm,
                "loss_tokens": result.tokens,
                **throughput.report(),
                "peak_mem_gb": _max_over_ranks(peak_memory_gb()),
                "skipped_steps": state.skipped_steps,
                "elapsed_s": elapsed,
                "remaining_s": elapsed / (state.step - first_step) * (steps - state.step),
            }
            window_loss = window_tokens = 0.0
            window_aux.clear()
        if eval_every and (state.step % eval_every == 0 or state.step == steps):
            with synced_params(model):
                eval_loss = evaluate(model, _eval_batches(evals, config, layout, pad_id, pad_multiple))
            row = row or {"step": state.step, "total_steps": steps}
            row["eval_loss"] = eval_loss
        if row is not None and log is not None:
            log.write(row)
            _write_line(progress, format_row(row))
        stopping = stop.agreed()
        if state.step % t.save_steps == 0 or stopping:
            with synced_params(model):
                path = ckpt.save_checkpoint(
                    t.output_dir, state.step, bundle.chunks, optimizer, scheduler,
                    {"data": source.state_dict(), "skipped_steps": state.skipped_steps,
                     "consumed_samples": state.consumed_samples},
                    config, config.model.model_name_or_path, t.save_total_limit,
                    tokenizer=tokenizer if eos_replaced else None,
                )
            _say(f"saved {path}")
        if stopping:
            return stop.signum or signal.SIGTERM
    if progress is not None:
        progress.close()
    return None


def _max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _progress(done: int, total: int):
    if dist.get_rank() != 0:
        return None
    from tqdm.auto import tqdm

    # disable=None: a live bar in a terminal, none in log files (the metric lines carry the news)
    return tqdm(total=total, initial=done, desc="training", unit="step", dynamic_ncols=True, file=sys.stderr, disable=None)


def _write_line(progress, line: str) -> None:
    if progress is not None:
        progress.write(f"megatune: {line}", file=sys.stdout)
    else:
        print(f"megatune: {line}", flush=True)
