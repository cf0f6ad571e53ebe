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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatune.config import Config, ConfigError, Layout
from megatune.data.collator import mask_out, pad_multiple_for
from megatune.data.source import rank_share
from megatune.distributed import device
from megatune.engine import checkpoint as ckpt
from megatune.engine.metrics import (
    RUNNING_LOG, ExpertLoad, MetricsLog, RecentRate, Throughput, format_row, llamafactory_fields, moe_aux_loss,
    peak_memory_gb, plot_loss,
)
from megatune.engine.optim import build_optimizer, build_scheduler, schedule_problems, wrap_ddp
from megatune.engine.step import StepResult, evaluate, micro_batches, train_step, uniform_length
from megatune.models.hf_io import save_tokenizer
from megatune.stages import get_stage


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
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# Rank 0's lines before the run's log exists; they open running_log.txt (see Run.say).
_early_lines: list[str] = []


def _say(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"megatune: {message}", flush=True)
        _early_lines.append(f"megatune: {message}")


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


def _stale_output(config: Config) -> list[int]:
    """Check output_dir before anything is written; return the old run's checkpoint steps that
    `overwrite_output_dir: true` replaces. Nothing is deleted here: a run that fails before its
    first save must leave the folder exactly as it was (see `Run.commit_output`)."""
    out = Path(config.training.output_dir)
    existing = ckpt.checkpoint_steps(out)
    if not existing or config.training.resume_from_checkpoint is not None:
        return []
    if not config.training.overwrite_output_dir:
        raise ConfigError([
            f"output_dir {out} already holds checkpoints {existing}; set resume_from_checkpoint: auto "
            "to continue that run, or overwrite_output_dir: true to start over (the old checkpoints "
            "are removed once the new run has saved its first one)"
        ])
    return existing


def _build_data(config: Config, tokenizer, layout: Layout):
    from megatune.data.source import build_train_source

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
    _early_lines[:] = [f"megatune: {layout.describe()}", *(f"megatune: {note}" for note in config.notes)]
    stage = get_stage(config)
    _check_run_keys(config)
    stale = _stale_output(config)
    resume = ckpt.resolve_resume(t.resume_from_checkpoint, t.output_dir)
    if resume is None and t.resume_from_checkpoint == "auto":
        _say(f"resume_from_checkpoint: auto: no checkpoint in {t.output_dir}; starting from step 0")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos_note = stage.prepare_tokenizer(config, tokenizer)
    if eos_note:
        _say(eos_note)
    source, evals, stats = _build_data(config, tokenizer, layout)
    steps = total_steps(config, source.steps_per_epoch)
    if schedule_problems(config, steps):
        raise ConfigError(schedule_problems(config, steps))
    _say(f"data: {stats.line()}; {source.steps_per_epoch or 'unknown'} steps per epoch, training {steps} steps")

    bundle = build_model(config, model_dir)
    if resume is None:
        load_hf_weights(bundle, model_dir)
    frozen = bundle.provider.freeze(bundle.chunks, config)
    if frozen:
        _say(f"{frozen} parameter tensors frozen (no gradients, no optimizer state; exported as loaded)")
    stage.attach(config, bundle)
    model = wrap_ddp(bundle.chunks, bundle.config, config)
    optimizer = build_optimizer(model, bundle.config, config)
    scheduler = build_scheduler(optimizer, config, steps)
    state = ckpt.TrainerState()
    if resume is not None:
        saved = ckpt.load_checkpoint(resume, bundle.chunks, optimizer, scheduler)
        source.load_state_dict(saved["data"])
        state = ckpt.TrainerState(saved["step"], saved["skipped_steps"], saved["consumed_samples"])
        _say(f"resumed from {resume} at step {state.step}")

    run = Run(config, layout, stage, bundle, model, optimizer, scheduler, source, evals, state, steps,
              pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
              tokenizer_to_save=tokenizer if eos_note else None, stale_steps=stale)
    stop = StopFlag()
    stop.install()
    try:
        stopped = run.loop(stop)
    finally:
        stop.restore()
        run.close()
    if stopped is not None:
        run.say(f"stopped by signal {stopped} at step {state.step}; checkpoint saved. Continue with "
                f"--resume_from_checkpoint auto --output_dir {t.output_dir}")
        return 128 + stopped
    run.commit_output()  # a run that ends without a save replaces the old run's files here
    with synced_params(model):
        export_hf(bundle, model_dir, t.output_dir, param_dtype(config))
    if dist.get_rank() == 0:
        if eos_note:
            save_tokenizer(tokenizer, Path(t.output_dir))
        if t.plot_loss:
            problem = plot_loss(run.log.rows(), Path(t.output_dir) / "training_loss.png")
            if problem:
                print(f"megatune: {problem}", file=sys.stderr)
                run.log.say(f"megatune: {problem}")
        run.write_summary()
        run.say(f"done: {state.step} steps ({state.skipped_steps} skipped); Hugging Face "
                f"checkpoint written to {t.output_dir}")
    return 0


def nonfinite_message(step: int, result: StepResult) -> str:
    """Which part of a skipped step was not finite: the loss itself, or (with a finite loss) the
    gradients, e.g. after a learning rate that blew the weights up."""
    if result.nonfinite == "loss":
        return f"step {step}: the loss is {result.loss} (not finite)"
    return f"step {step}: {result.nonfinite or 'gradients'} not finite (the loss, {result.loss:.4f}, is finite)"


class LogWindow:
    """The steps since the last log row: the stage's metrics averaged with each step's unit count
    as weight (skipped steps left out), the MoE load-balancing loss, the last gradient norm."""

    def __init__(self, units_key: str):
        self.units_key = units_key
        self.last_grad_norm: float | None = None
        self.reset()

    def reset(self) -> None:
        self.last_grad_norm = None  # a window of skipped steps has none: never an older step's
        self.sums: dict[str, float] = {}
        self.weight = 0.0
        self.aux: list[float] = []

    def add(self, result: StepResult, aux_loss: float | None) -> None:
        if aux_loss is not None:
            self.aux.append(aux_loss)
        if result.skipped:
            return
        for key, value in result.metrics.items():
            if key != self.units_key:
                self.sums[key] = self.sums.get(key, 0.0) + value * result.units
        self.weight += result.units
        self.last_grad_norm = result.grad_norm

    def metrics(self) -> dict:
        means = {k: v / self.weight for k, v in self.sums.items()} if self.weight else {"loss": math.nan}
        return {**means, **({"aux_loss": sum(self.aux) / len(self.aux)} if self.aux else {})}


@dataclass
class Run:
    """One training run's moving parts; `loop` runs the steps with logging, evaluation, saving."""

    config: Config
    layout: Layout
    stage: object  # stages.Stage
    bundle: object  # models.build.ModelBundle
    model: list
    optimizer: object
    scheduler: object
    source: object  # data.source.SampleSource
    evals: list
    state: ckpt.TrainerState
    steps: int
    pad_id: int
    tokenizer_to_save: object = None  # saved with checkpoints when the run changed its eos
    # overwrite_output_dir: the old run's checkpoints, removed right after this run's first save
    stale_steps: list = field(default_factory=list)

    def __post_init__(self):
        c, t = self.config, self.config.training
        self.pad_multiple = pad_multiple_for(self.layout.tp, self.layout.cp, c.parallel.sequence_parallel)
        self.packed = bool(c.data.packing)
        self.eval_every = _eval_every(c, self.source.steps_per_epoch) if self.evals else None
        self.throughput = Throughput(self.bundle.step_flops, self.layout.world_size)
        moe_load = c.parallel.moe_log_load and self.bundle.config.num_moe_experts
        self.expert_load = ExpertLoad(self.bundle.chunks) if moe_load else None
        self.window = LogWindow(units_key=self.stage.sum_names[1])
        # A fresh run replacing an old run's log keeps its rows in memory until its first save,
        # so a run that dies before then leaves the old trainer_log.jsonl as it was.
        defer = self.state.step == 0 and any((Path(t.output_dir) / name).is_file()
                                             for name in ("trainer_log.jsonl", RUNNING_LOG))
        self.log = None
        if dist.get_rank() == 0:
            self.log = MetricsLog(t.output_dir, t.report_to, self.state.step, defer=defer, run_name=t.run_name,
                                  config=c.to_flat_dict(), lines=_early_lines)
        self.nonfinite_in_row = 0
        self.progress = None  # rank 0's tqdm bar while the loop runs (None without a terminal)
        self.rate = RecentRate()
        self.on_gpu = torch.cuda.is_available()
        self.session_start = (self.state.step, self.state.consumed_samples)
        self.loss_sum, self.loss_steps = 0.0, 0  # this session's unskipped steps (train_loss)

    def say(self, message: str) -> None:
        """A rank-0 line: through the progress bar when there is one (so it never lands on the
        bar's line), else printed; kept in running_log.txt either way."""
        if dist.get_rank() != 0:
            return
        line = f"megatune: {message}"
        if self.progress is not None:
            self.progress.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
        if self.log is not None:
            self.log.say(line)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    def micro_batches(self, global_batch: list, share: list, micro_batch_size: int) -> list:
        """Collated micro-batches of this rank's share; pipeline- and expert-parallel runs pad
        every micro-batch of the step to one length (see engine/step.py:uniform_length)."""
        length = None
        if _needs_uniform_length(self.layout):
            length = uniform_length(self.stage, global_batch, micro_batch_size, self.pad_multiple, self.packed)
        return micro_batches(self.stage, share, micro_batch_size, self.pad_id, self.pad_multiple, self.packed, length)

    def loop(self, stop: StopFlag) -> int | None:
        """Run steps until done; returns the signal number if a signal stopped training, else None."""
        progress = self.progress = _progress(self.state.step, self.steps)
        self.rate.start(self.state.step)
        try:
            while self.state.step < self.steps:
                result = self.step()
                self.rate.tick(self.state.step)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{result.loss:.4f}")
                row = self.log_row(result) if self.due(self.config.training.logging_steps) else None
                if self.eval_every and self.due(self.eval_every):
                    row = {**(row or {"step": self.state.step, "total_steps": self.steps}), **self.evaluate()}
                if row is not None and self.log is not None:
                    elapsed = row.setdefault("elapsed_s", self.rate.elapsed())  # eval-only rows get them here
                    remaining = row.setdefault("remaining_s", self.rate.remaining(self.state.step, self.steps))
                    row.update(llamafactory_fields(self.state.step, self.steps, elapsed, remaining))
                    self.log.write(row)
                    self.say(format_row(row, on_gpu=self.on_gpu, with_time=progress is None))
                stopping = stop.agreed()
                if self.due(self.config.training.save_steps, at_end=False) or stopping:
                    self.save()
                if stopping:
                    return stop.signum or signal.SIGTERM
        finally:
            if progress is not None:
                progress.close()
            self.progress = None
        return None

    def due(self, every: int, at_end: bool = True) -> bool:
        return self.state.step % every == 0 or (at_end and self.state.step == self.steps)

    def step(self) -> StepResult:
        """One optimizer step on the next global batch; stops training after too many
        non-finite steps in a row."""
        t, state = self.config.training, self.state
        global_batch = self.source.next_global_batch()
        share = rank_share(global_batch, ps.get_data_parallel_rank(), self.layout.dp)
        self.lr = self.scheduler.get_lr(self.optimizer.param_groups[0])  # the rate this step uses
        batches = self.micro_batches(global_batch, share, self.layout.micro_batch_size)
        result = train_step(self.stage, self.bundle.provider, self.model, self.optimizer, batches)
        self.scheduler.step(increment=1)
        self.window.add(result, moe_aux_loss(len(batches)))
        state.step += 1
        state.consumed_samples += len(global_batch)
        self.throughput.add([n for s in global_batch for n in s.doc_lens],
                            [g for s in global_batch for g in getattr(s, "image_grid_thw", [])])
        if not result.skipped:
            self.nonfinite_in_row = 0
            self.loss_sum, self.loss_steps = self.loss_sum + result.loss, self.loss_steps + 1
            return result
        state.skipped_steps += 1
        self.nonfinite_in_row += 1
        self.say(f"{nonfinite_message(state.step, result)}; update skipped ({self.nonfinite_in_row} in a row)")
        if self.nonfinite_in_row >= t.max_nonfinite_steps:
            raise TrainingError(
                f"{self.nonfinite_in_row} steps in a row had a non-finite loss or gradient (last at "
                f"{nonfinite_message(state.step, result)}); stopping. Lower learning_rate, check the data, "
                "or raise max_nonfinite_steps"
            )
        return result

    def log_row(self, result: StepResult) -> dict:
        state = self.state
        load = self.expert_load
        row = {
            "step": state.step,
            "total_steps": self.steps,
            "epoch": state.step / self.source.steps_per_epoch if self.source.steps_per_epoch else None,
            **self.window.metrics(),
            **({"expert_load": load.report(self.bundle.config.num_layers, self.bundle.config.num_moe_experts)}
               if load else {}),
            "lr": self.lr,
            "grad_norm": self.window.last_grad_norm,
            self.window.units_key: result.units,
            **self.throughput.report(),
            "peak_mem_gb": _max_over_ranks(peak_memory_gb()),
            "skipped_steps": state.skipped_steps,
            "elapsed_s": self.rate.elapsed(),
            "remaining_s": self.rate.remaining(state.step, self.steps),  # from the recent steps' pace
        }
        self.window.reset()
        return row

    def evaluate(self) -> dict:
        """The stage's metrics on the evaluation set, as `eval_<name>` fields."""
        evals, layout = self.evals, self.layout
        mine = evals[ps.get_data_parallel_rank()::layout.dp]
        mbs = self.config.training.per_device_eval_batch_size
        length = uniform_length(self.stage, evals, mbs, self.pad_multiple, self.packed) if _needs_uniform_length(layout) else None
        batches = micro_batches(self.stage, mine or evals[:1], mbs, self.pad_id, self.pad_multiple, self.packed, length)
        if not mine:  # a rank short of samples still joins the collectives, counting nothing
            batches = [mask_out(b) for b in batches]
        with synced_params(self.model):
            metrics = evaluate(self.stage, self.bundle.provider, self.model, [batches])
        return {f"eval_{k}": v for k, v in metrics.items() if k != self.window.units_key}

    def save(self) -> None:
        state, t = self.state, self.config.training
        with synced_params(self.model):
            path = ckpt.save_checkpoint(
                t.output_dir, state.step, self.bundle.chunks, self.optimizer, self.scheduler,
                {"data": self.source.state_dict(), "skipped_steps": state.skipped_steps,
                 "consumed_samples": state.consumed_samples},
                self.config, self.config.model.model_name_or_path, t.save_total_limit,
                tokenizer=self.tokenizer_to_save,
            )
        self.commit_output(keep=state.step)
        self.say(f"saved {path}")

    def write_summary(self) -> None:
        """Rank 0, at the end: train_results.json, all_results.json and trainer_state.json in
        output_dir, as a transformers Trainer run leaves them (metrics of this session)."""
        t, state = self.config.training, self.state
        runtime = max(self.rate.elapsed(), 1e-9)
        first_step, first_samples = self.session_start
        epoch = state.step / self.source.steps_per_epoch if self.source.steps_per_epoch else None
        metrics = {
            "epoch": epoch,
            "train_loss": self.loss_sum / self.loss_steps if self.loss_steps else None,
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round((state.consumed_samples - first_samples) / runtime, 3),
            "train_steps_per_second": round((state.step - first_step) / runtime, 3),
            "total_flos": self.throughput.total_flops,
        }
        self.log.write_summary(metrics, {
            "global_step": state.step, "max_steps": self.steps, "epoch": epoch,
            "num_train_epochs": t.num_train_epochs, "logging_steps": t.logging_steps,
            "eval_steps": self.eval_every, "save_steps": t.save_steps,
            "train_batch_size": t.per_device_train_batch_size, "total_flos": self.throughput.total_flops,
            "best_metric": None, "best_model_checkpoint": None,
            "is_local_process_zero": True, "is_world_process_zero": True,
        })

    def commit_output(self, keep: int | None = None) -> None:
        """This run now owns output_dir: remove the old run's checkpoints (all but `keep`, the
        step just saved, which replaced any old one of that number) and its log rows."""
        if dist.get_rank() == 0:
            for step in self.stale_steps:
                if step != keep:
                    shutil.rmtree(Path(self.config.training.output_dir) / f"checkpoint-{step}", ignore_errors=True)
            if self.log is not None:
                self.log.commit()
        self.stale_steps = []


def _max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], device=device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _progress(done: int, total: int):
    if dist.get_rank() != 0:
        return None
    from tqdm.auto import tqdm

    # disable=None: a live bar in a terminal, none in log files (the metric lines carry the news,
    # with elapsed and remaining time); without a terminal there is no bar object at all
    bar = tqdm(total=total, initial=done, desc="training", unit="step", dynamic_ncols=True, file=sys.stderr, disable=None)
    return None if bar.disable else bar

