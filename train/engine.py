"""The training loop: MMSegmentation's ISANet recipe, iteration-based, DDP-aware, exactly resumable.

A run is a few functions, torchvision-references style: `setup` (datasets, data checks, model,
optimizer, resume), `train_step` (forward, MMSeg loss, finite check, backward, SGD and poly steps),
`evaluate_run` (val mIoU, best weights, early stop) and `save_run` (an exactly resumable checkpoint);
`train(cfg)` strings them together and returns the final metrics and paths.

Rank 0 writes into the work dir, which it locks for the run (`.lock`): `config.json` (the resolved
configuration), `log.jsonl`, `checkpoints/iter_N.pt`, `best.safetensors` (best val mIoU so far),
`model.safetensors` (the last weights) and `curves.png`; the weights files describe themselves
(`zoo.metadata`: classes, palette, the test scale validation used). Evaluation runs on every rank (the
metric all-reduces). SIGINT / SIGTERM stop the run after the current step, or the checkpoint being
written, with a checkpoint of it (`TrainingInterrupted`); one during an evaluation abandons it, and a stop
before an iteration's evaluation leaves it pending: the resumed run makes it up first (evaluations
never draw from the training RNG streams, so the resumed run equals an uninterrupted one bit for bit).
A second signal aborts at once, and no half-written file is ever left.

A work dir that holds another run's outputs is refused (`WorkDirInUse`: --resume, a new --work-dir or
--overwrite, which moves them to `previous-<time>/`), and so is a --resume that finds such outputs but no complete
readable checkpoint (an empty work dir starts a new run); a resume whose settings differ from its
checkpoint's is refused field by field (`TrainConfig.resume_differences`). The newest
`keep_checkpoints` (2) complete checkpoints are kept.

Example (a few CPU iterations on a custom folder dataset):
    >>> result = finetune("isanet_r50-d8_512x512_20k_voc12aug", "my_data", work_dir="runs/demo",  # doctest: +SKIP
    ...                   iters=20, crop_size=(64, 64), batch_size=2, weights=None, device="cpu")
    >>> sorted(result)                                                                             # doctest: +SKIP
    ['best', 'checkpoint', 'classes', 'curves', 'final_loss', 'history', 'iterations', 'log', 'metrics', ...]
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from tqdm import tqdm

from zoo.utils import write_bytes_atomic

from . import checkpoint as ckpt
from . import distributed as D
from . import tuning
from .builders import build_datasets, build_model, check_folder_data, check_resume_config, fetch_on_main_first
from .config import TrainConfig
from .data import IterationBatchSampler, TrainSet, build_loader
from .loss import isanet_loss
from .lock import WorkDirLock
from .plot import plot_curves, read_log
from .optim import build_optimizer, build_scheduler
from .schedule import PolyLR
from .pipeline import RecipePipeline, normalize_batch

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the iteration and the last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """SIGINT / SIGTERM stopped the run after a complete step and a checkpoint; `exit_code` is 130 / 143."""

    def __init__(self, signum: int, iteration: int, checkpoint: Optional[Path], pending_eval: bool = False):
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        self.exit_code = 128 + signum
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
        later = f" (its evaluation runs first on --resume)" if pending_eval and checkpoint else ""
        super().__init__(f"stopped by {signal.Signals(signum).name} after iteration {iteration}{later}; {where}")


@dataclass
class Run:
    """The state of one training run (what `setup` builds and the loop advances)."""

    cfg: TrainConfig
    ctx: D.DistContext
    work: Path
    train_set: Any
    val_set: Optional[Any]
    model: nn.Module  # DistributedDataParallel under torchrun
    inner: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: PolyLR
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]
    sampler: IterationBatchSampler
    batches: Iterator[Tuple[torch.Tensor, torch.Tensor]]
    start_iter: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    last_good: Optional[Path] = None
    resumed_from: Optional[Path] = None
    # the iteration's evaluation has not run yet (a stop came first): a resumed run makes it up first
    pending_eval: bool = False
    # loss sums since the last train record of log.jsonl, so that a resumed run logs the same averages
    window: Dict[str, float] = field(default_factory=dict)
    window_n: int = 0
    # fine-tuning options (train.tuning): the loss modules (None: the recipe's), class weights, TensorBoard
    criterion: Optional[nn.Module] = None
    class_weights: Optional[List[float]] = None
    tb: Optional[Any] = None

    log_path = property(lambda self: self.work / "log.jsonl")
    curves_path = property(lambda self: self.work / "curves.png")
    weights_path = property(lambda self: self.work / "model.safetensors")
    best_path = property(lambda self: self.work / "best.safetensors")

    @property
    def best(self) -> Optional[Dict[str, Any]]:
        """The evaluation with the highest mIoU so far (the first of equals)."""
        scored = [m for m in self.history if m.get("mIoU") is not None]
        return max(scored, key=lambda m: m["mIoU"]) if scored else None


def setup(cfg: TrainConfig, ctx: D.DistContext) -> Run:
    """Everything before the first iteration: datasets, model, optimizer, schedule, resume, data loader."""
    device, work = ctx.device, Path(cfg.work_dir)
    _claim_work_dir(cfg, ctx)
    if ctx.is_main:
        ckpt.checkpoint_dir(work).mkdir(parents=True, exist_ok=True)
        for stale in ckpt.remove_stale_temporaries(work):
            log.info("removed %s (left by a run killed while writing a checkpoint)", stale)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # MMSeg's cudnn_benchmark=True
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"global batch {cfg.batch_size} does not split over {ctx.world_size} processes; "
                         f"pass --batch-size as a multiple of {ctx.world_size}")
    per_gpu_batch = cfg.batch_size // ctx.world_size
    if cfg.tensorboard and ctx.is_main:
        tuning.check_tensorboard()  # the install hint before any work

    # a resumed run takes every weight from its checkpoint: no initial weights to read or download
    found = ckpt.load_latest_checkpoint(work, map_location="cpu") if cfg.resume else None
    if cfg.resume and found is None:
        _refuse_resume_without_checkpoint(cfg, ctx)
    cfg.resolve_keep_checkpoints(found[0].get("config") if found is not None else None)
    if found is not None:  # refuse a changed setting before any other work
        check_resume_config(found[0].get("config", {}), cfg, ctx)

    if cfg.check_data and cfg.dataset == "folder" and ctx.is_main:
        check_folder_data(cfg)
    train_set, val_set = build_datasets(cfg)
    num_classes = int(train_set.num_classes)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ValueError(f"--num-classes {cfg.num_classes} disagrees with the dataset's {num_classes} classes "
                         f"({cfg.data_root}); drop --num-classes or fix dataset.json")
    # refused (a count that is not the class count, a bad file) before anything trains
    class_weights = tuning.resolve_class_weights(cfg.class_weights, cfg, num_classes, list(train_set.classes))
    if found is not None and class_weights:
        class_weights = _resumed_class_weights(found[0], work, class_weights, cfg, ctx)
    if class_weights and ctx.is_main:
        log.info("class weights (--class-weights %s):\n%s", cfg.class_weights,
                 tuning.format_class_weights(class_weights, list(train_set.classes)))

    if found is None and ctx.distributed and "auto" in (cfg.weights, cfg.backbone_weights):
        fetch_on_main_first(cfg, ctx)
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg, num_classes, pretrained=found is None).to(device)
    frozen = tuning.apply_freezing(model, cfg.freeze_bn, cfg.freeze_backbone)  # before DDP sees requires_grad
    if frozen and ctx.is_main:
        log.info("frozen: %s", ", ".join(frozen))
    if ctx.distributed:
        model = D.convert_sync_batchnorm(model, device)
        tuning.apply_freezing(model, cfg.freeze_bn, cfg.freeze_backbone)  # the SyncBatchNorm copies stay frozen
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    inner = model.module if ctx.distributed else model
    optimizer = build_optimizer(cfg, model)  # the recipe's SGD unless --optimizer / --head-lr-mult / ...
    scheduler = build_scheduler(cfg, optimizer)  # the recipe's poly unless --warmup
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    if ctx.is_main:
        from zoo.segmenter import warn_emulated_bf16

        warn_emulated_bf16(device, AMP_DTYPES.get(cfg.amp) if cfg.amp else None)
    run_kwargs: Dict[str, Any] = {}
    rng_restore = None
    if found is not None:
        state, path = found
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.max_iters = cfg.iters  # a changed --iters stretches (or shortens) the rest of the schedule
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng", [])
        rng_restore = rngs[ctx.rank] if ctx.rank < len(rngs) else None
        window = state.get("log_window") or {}
        run_kwargs = dict(start_iter=int(state["iteration"]), history=list(state.get("history", [])),
                          last_good=path, resumed_from=path, pending_eval=bool(state.get("pending_eval", False)),
                          window={k: float(v) for k, v in (window.get("sums") or {}).items()},
                          window_n=int(window.get("n", 0)))
        if ctx.is_main:
            log.info("resumed from %s (iteration %d)", path, run_kwargs["start_iter"])
            _truncate_log(work / "log.jsonl", run_kwargs["start_iter"])
    elif ctx.is_main:
        if cfg.resume:  # the work dir holds no run's outputs (else refused above)
            log.warning("--resume: nothing to resume in %s (no run's outputs there); starting a new run", work)
        (work / "log.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
    D.barrier(ctx)

    # RNG last: nothing after this point but the loop draws random numbers (dropout)
    torch.manual_seed(cfg.seed + 1 + ctx.rank)
    if rng_restore is not None:
        ckpt.set_rng_state(rng_restore, device)
    start_iter = run_kwargs.get("start_iter", 0)
    # the sampler counts micro-batches: --accum-steps N draws N of them per iteration
    sampler = IterationBatchSampler(len(train_set), per_gpu_batch, seed=cfg.seed, world_size=ctx.world_size,
                                    rank=ctx.rank, start_iteration=start_iter * cfg.accum_steps)
    transforms = RecipePipeline(cfg.crop_size, cfg.img_scale, cfg.ratio_range, cfg.cat_max_ratio)  # uint8 out
    loader = build_loader(TrainSet(train_set, transforms), sampler, num_workers=_workers(cfg, ctx),
                          pin_memory=device.type == "cuda")
    run = Run(cfg, ctx, work, train_set, val_set, model, inner, optimizer, scheduler, scaler,
              AMP_DTYPES.get(cfg.amp) if cfg.amp else None, sampler, iter(loader), **run_kwargs)
    run.class_weights = class_weights
    run.criterion = tuning.build_criterion(cfg, num_classes, class_weights)
    if ctx.is_main:
        _write_config(run, per_gpu_batch)
        if cfg.tensorboard:
            # log.jsonl keeps the records up to the checkpoint's iteration: the event files keep the same
            run.tb = tuning.TensorBoardLog(work, list(train_set.classes),
                                           purge_step=run.start_iter + 1 if run.resumed_from else None)
    return run


# what a run leaves in its work dir; any of them there means the folder holds a run
RUN_OUTPUTS = ("config.json", "log.jsonl", "best.safetensors", "model.safetensors", "curves.png")
# the folders a run writes into its work dir (--overwrite moves them aside with RUN_OUTPUTS)
RUN_FOLDERS = ("checkpoints", "tensorboard")


class WorkDirInUse(ValueError):
    """The work dir holds another run's outputs and neither --resume nor --overwrite was given."""


def previous_outputs(work_dir: Union[str, Path]) -> List[str]:
    """What an earlier run left in `work_dir` (file names; the checkpoints as one entry), empty when none."""
    work = Path(work_dir)
    found = [name for name in RUN_OUTPUTS if (work / name).is_file()]
    checkpoints = ckpt.list_checkpoints(work)
    if checkpoints:
        found.append(f"checkpoints/ ({len(checkpoints)} checkpoint{'s' if len(checkpoints) > 1 else ''}, "
                     f"newest {checkpoints[0][1].name})")
    return found


def move_aside(work_dir: Union[str, Path]) -> Path:
    """Move an earlier run's outputs in `work_dir` (RUN_OUTPUTS and its `checkpoints/` and `tensorboard/`
    folders) into a new `work_dir/previous-<date-time>/`; nothing is deleted. Returns that folder.

    Only what a run writes is moved: a work dir may also hold the user's own files (`--work-dir .` beside
    the dataset), which stay where they are."""
    work = Path(work_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = work / f"previous-{stamp}", 1
    while target.exists():
        n += 1
        target = work / f"previous-{stamp}-{n}"
    target.mkdir()
    for name in RUN_OUTPUTS + RUN_FOLDERS:
        entry = work / name
        if entry.exists() or entry.is_symlink():
            os.replace(entry, target / name)
    return target


def _claim_work_dir(cfg: TrainConfig, ctx: D.DistContext) -> None:
    """A run never silently reuses a work dir: refuse (naming what is there and the three choices) or,
    with --overwrite, move the earlier outputs aside. --resume continues what is there."""
    message = None
    if ctx.is_main and not cfg.resume:
        found = previous_outputs(cfg.work_dir)
        if found and cfg.overwrite:
            moved = move_aside(cfg.work_dir)
            log.warning("--overwrite: moved the earlier run's outputs (%s) to %s", ", ".join(found), moved)
        elif found:
            message = (f"{cfg.work_dir} holds the outputs of an earlier run ({', '.join(found)}). Choose one: "
                       "--resume to continue that run; a new --work-dir for a separate run; or --overwrite to "
                       f"start afresh here (the old outputs are moved to {Path(cfg.work_dir) / 'previous-<time>'}"
                       "/, nothing is deleted)")
    message = D.broadcast_object(message, ctx)
    if message:
        raise WorkDirInUse(message)


def _resumed_class_weights(state: Dict[str, Any], work: Path, computed: List[float], cfg: TrainConfig,
                           ctx: D.DistContext) -> List[float]:
    """An exact resume keeps the class weights its run trained with (the checkpoint's, else config.json's for
    checkpoints written before they were stored): `--class-weights auto` (or a FILE) is not re-read from data
    that may have changed since. Weights the data (or file) now gives differently are named in one line."""
    stored = state.get("class_weight_values")
    if stored is None:
        try:
            stored = json.loads((work / "config.json").read_text()).get("class_weight_values")
        except (OSError, ValueError, AttributeError):
            stored = None
    if stored is None:
        return computed
    where = f"--resume: the class weights stored in {work}"
    if not isinstance(stored, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                               for w in stored):
        raise ValueError(f"{where} are not a list of numbers ({stored!r}); pass --class-weights w1,w2,... "
                         "with the run's values")
    values = tuning._parse_weights(json.dumps([float(w) for w in stored]), where)
    if len(values) != len(computed):
        raise ValueError(f"{where} are {len(values)} for {len(computed)} classes; the run cannot continue on "
                         "this dataset: use a new --work-dir")
    if values != list(computed) and ctx.is_main:
        log.warning("--class-weights %s now gives %s, but the run trained with %s: resuming with the run's weights "
                    "(start a new run, e.g. --overwrite, to use the new ones)", cfg.class_weights,
                    [round(w, 4) for w in computed], [round(w, 4) for w in values])
    return values


def _refuse_resume_without_checkpoint(cfg: TrainConfig, ctx: D.DistContext) -> None:
    """--resume found no complete readable checkpoint: an empty or new work dir starts a new run, but one that
    holds a run's outputs is refused (a new run would replace its log.jsonl, best.safetensors, config.json)."""
    message = None
    if ctx.is_main:
        found = previous_outputs(cfg.work_dir)
        if found:
            message = (f"--resume: {cfg.work_dir} holds an earlier run's outputs ({', '.join(found)}) but no complete "
                       "readable checkpoint to continue from; a new run would replace them. Choose one: a new "
                       "--work-dir for a separate run; or --overwrite instead of --resume to start afresh here (the "
                       f"old outputs are moved to {Path(cfg.work_dir) / 'previous-<time>'}/, nothing is deleted)")
    message = D.broadcast_object(message, ctx)
    if message:
        raise WorkDirInUse(message)


def _workers(cfg: TrainConfig, ctx: D.DistContext) -> int:
    if cfg.workers is not None:
        return cfg.workers
    if ctx.device.type != "cuda":
        return 0
    # at least the recipe's 2 / 4 workers per GPU, more when the CPU has them (augmentations do not
    # depend on the count)
    from zoo import get_config

    recipe_workers = get_config(cfg.model).workers_per_gpu if cfg.dataset != "folder" else 2
    return max(recipe_workers, min(8, (os.cpu_count() or 2) // ctx.world_size))


def _write_config(run: Run, per_gpu_batch: int) -> None:
    """config.json: the run's fully resolved configuration, beside its outputs."""
    from eval.report import write_json_atomic
    from zoo.metadata import project_version

    cfg = run.cfg
    resolved = {**cfg.to_dict(), "eval_every": cfg.eval_every, "checkpoint_every": cfg.checkpoint_every,
                "eval_scale": list(cfg.eval_scale) if cfg.eval_scale else list(run.inner.test_settings.scale_wh),
                "num_classes": int(run.train_set.num_classes), "classes": list(run.train_set.classes),
                "train_images": len(run.train_set), "val_images": len(run.val_set) if run.val_set else 0,
                "world_size": run.ctx.world_size, "per_gpu_batch": per_gpu_batch,
                "workers": _workers(cfg, run.ctx), "device": str(run.ctx.device), "torch": torch.__version__,
                "isa_triton": project_version(), **tuning.resolved_config(cfg, run.class_weights, run.criterion)}
    write_json_atomic(run.work / "config.json", resolved)


# --------------------------------------------------------------------------------------------------
# one step, one evaluation, one checkpoint


def train_step(run: Run, images: Any, labels: Any, iteration: int,
               stop_requested: bool = False) -> Tuple[Dict[str, float], bool]:
    """One optimizer iteration on a batch; returns (the losses averaged over ranks, whether any rank asked to stop).

    With --accum-steps N `images` / `labels` are lists of N micro-batches (`tuning.next_batches`): each one's
    loss / N is back-propagated, the gradients add up, and the optimizer steps once; the logged losses are
    the micro-batches' mean. Raises TrainingDiverged (naming the last good checkpoint) when a loss is not finite.
    """
    cfg, device = run.cfg, run.ctx.device
    micro = list(zip(images, labels)) if isinstance(images, list) else [(images, labels)]
    autocast = (torch.autocast(device.type, dtype=run.amp_dtype) if run.amp_dtype is not None
                else contextlib.nullcontext())
    values: Dict[str, float] = {}
    stop_votes = 0.0
    for k, (images, labels) in enumerate(micro):
        # the worker's uint8 crops are normalised here, on the device, and its padding marks become image 0 /
        # label 255 (MMSeg's data preprocessor; bit-identical to normalising in the worker)
        images, labels = normalize_batch(images.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                                         run.inner.config.mean, run.inner.config.std)
        last = k == len(micro) - 1
        # DDP all-reduces the gradients once, at the last micro-batch
        sync = run.model.no_sync() if run.ctx.distributed and not last else contextlib.nullcontext()
        with sync:
            with autocast:
                outputs = run.model(images)
            losses = isanet_loss(outputs, labels, bool(run.inner.align_corners), aux_weight=cfg.aux_weight,
                                 avg_non_ignore=cfg.avg_non_ignore, criterion=run.criterion)
            names = list(losses)
            # the stop flag rides along with the losses, so every rank stops after the same iteration
            flags = torch.stack([losses[n].detach().float() for n in names] + [torch.tensor(float(stop_requested))])
            reduced = D.all_reduce_mean(flags, run.ctx).tolist()
            if not math.isfinite(reduced[0]):
                where = (f"the last good checkpoint is {run.last_good}; resume from it with --resume (after lowering "
                         "--lr or changing --amp)") if run.last_good else "no checkpoint was written yet"
                terms = ", ".join(f"{n} {v}" for n, v in zip(names[1:], reduced[1:-1]) if ".loss_" in n)
                raise TrainingDiverged(f"loss is {reduced[0]} at iteration {iteration}/{cfg.iters} ({terms}); "
                                       f"training stopped, {where}")
            for n, v in zip(names, reduced[:-1]):
                values[n] = values.get(n, 0.0) + v / len(micro) if len(micro) > 1 else v
            stop_votes = max(stop_votes, reduced[-1])
            if k == 0:
                run.optimizer.zero_grad(set_to_none=True)
            loss = losses["loss"] / len(micro) if len(micro) > 1 else losses["loss"]
            run.scaler.scale(loss).backward()
        if not last:
            ckpt.fault_point("micro", iteration)  # between two micro-batches of iteration `iteration`
    ckpt.fault_point("iter", iteration)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return values, stop_votes > 0


def evaluate_run(run: Run, iteration: int, interruptible: Any = None) -> Dict[str, Any]:
    """Val mIoU now (every rank; the metric all-reduces); rank 0 logs it and keeps best.safetensors.

    The training RNG streams are left as they were (the evaluation's data loader draws a seed), so a run
    evaluates without changing what it trains. `interruptible`: a context manager around the evaluation
    proper (a stop signal may abort it there; nothing is logged or written then)."""
    from eval.evaluate import evaluate
    from zoo.inference import TestSettings

    cfg, device = run.cfg, run.ctx.device
    settings = TestSettings.from_model(run.inner, scale_wh=cfg.eval_scale)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with interruptible or contextlib.nullcontext():
            ckpt.fault_point("eval", iteration)
            result = evaluate(run.model, run.val_set, settings=settings, dtype=run.amp_dtype, device=device,
                              max_images=cfg.eval_max_images, num_workers=0 if device.type == "cpu" else 2,
                              progress=cfg.progress and run.ctx.is_main)
    keep = ("aAcc", "mIoU", "mAcc", "IoU", "Acc", "num_images")
    metrics = {"mode": "val", "iter": iteration, **{k: _finite(result[k]) for k in keep if k in result}}
    previous = run.best
    metrics["best"] = metrics.get("mIoU") is not None and (previous is None or metrics["mIoU"] > previous["mIoU"])
    run.history.append(metrics)
    if run.ctx.is_main:
        _append_jsonl(run.log_path, metrics, run.tb)  # "best": true marks the evaluation best.safetensors holds
        if metrics["best"]:
            save_weights_file(run, run.best_path, iteration)
    return metrics


def evaluations_without_improvement(history: Sequence[Dict[str, Any]]) -> int:
    """How many evaluations since the best one (0 when the last was the best)."""
    scores = [m.get("mIoU") for m in history]
    valid = [(s, i) for i, s in enumerate(scores) if s is not None]
    if not valid:
        return len(scores)
    best_index = max(valid, key=lambda t: (t[0], -t[1]))[1]
    return len(scores) - 1 - best_index


def save_run(run: Run, iteration: int) -> Optional[Path]:
    """An exactly resumable checkpoint of everything after `iteration` (every rank's RNG; rank 0 writes)."""
    cfg, ctx = run.cfg, run.ctx
    rngs = D.all_gather_object(ckpt.rng_state(ctx.device), ctx)  # every rank's dropout stream
    path = None
    if ctx.is_main:
        epoch, offset = run.sampler.position(iteration * cfg.accum_steps)  # the sampler counts micro-batches
        config = cfg.to_dict()
        config["_world_size"] = ctx.world_size
        state = {
            "model": run.inner.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
            "rng": [{k: v.cpu() for k, v in r.items()} for r in rngs],
            "data": {"iteration": iteration, "epoch": epoch, "offset": offset, "seed": cfg.seed,
                     "world_size": ctx.world_size, "per_gpu_batch": run.sampler.batch_size},
            "config": config, "history": run.history, "pending_eval": bool(run.pending_eval),
            "log_window": {"n": int(run.window_n), "sums": {k: float(v) for k, v in run.window.items()}},
            # the values the loss used (--class-weights auto counts the data): a resume uses these, not a recount
            "class_weight_values": [float(w) for w in run.class_weights] if run.class_weights else None,
        }
        path = ckpt.save_checkpoint(state, cfg.work_dir, iteration)
        ckpt.prune_checkpoints(cfg.work_dir, cfg.keep_checkpoints, current=iteration)
    path = D.broadcast_object(str(path) if path else None, ctx)
    return Path(path) if path else None


def save_weights_file(run: Run, path: Path, iteration: int) -> Path:
    """The weights now as a self-describing .safetensors (classes, palette, the validation's test scale)."""
    from zoo.inference import TestSettings
    from zoo.metadata import ModelMeta
    from zoo.weights import save_weights

    cfg, base = run.cfg, run.train_set
    best = run.best
    extra: Dict[str, Any] = {"source_file": "isa train", "train_iters": iteration, "dataset": cfg.dataset,
                             "val_split": cfg.val_split or ""}
    if cfg.dataset == "folder":
        extra["data"] = str(Path(cfg.data_root).resolve())
    if best is not None:
        extra.update(best_iter=best["iter"], best_mIoU=best["mIoU"])
    meta = ModelMeta.for_variant(run.inner.config, int(base.num_classes), base.classes, base.palette,
                                 test=TestSettings.from_model(run.inner, scale_wh=cfg.eval_scale),
                                 ignore_index=int(base.ignore_index), reduce_zero_label=bool(base.reduce_zero_label),
                                 extra=extra, class_weights=tuple(run.class_weights) if run.class_weights else None)
    return save_weights(run.inner.state_dict(), path, meta)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _append_jsonl(path: Path, record: Dict[str, Any], tb: Optional[Any] = None) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
    if tb is not None:  # --tensorboard: the same record as scalars
        tb.record(record)


def _truncate_log(path: Path, iteration: int) -> None:
    """On resume, drop records past the checkpoint (the killed run's tail) so the log has no repeats."""
    if not path.is_file():
        return
    kept = [json.dumps(r) for r in read_log(path) if int(r.get("iter", 0)) <= iteration]
    write_bytes_atomic(path, ("\n".join(kept) + ("\n" if kept else "")).encode())


def _finite(value: Any) -> Any:
    # JSON has no NaN; an absent class is null
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _plot(run: Run) -> None:
    try:
        plot_curves(read_log(run.log_path) if run.log_path.is_file() else [], run.curves_path,
                    title=f"{run.cfg.recipe or run.cfg.model} - {run.cfg.data_root}")
    except OSError as exc:  # a plot must never stop training
        log.warning("could not write %s: %s", run.curves_path, exc)


class _EvaluationInterrupted(Exception):
    """A stop signal came during an evaluation, which is dropped (the resumed run makes it up)."""


class _StopSignals:
    """SIGINT / SIGTERM ask the loop to stop after the current step (or checkpoint write), or abort an
    evaluation in progress; a second one aborts at once."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: Dict[int, Any] = {}
        self._in_evaluation = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: give up now (temporary files are removed on the way out)
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signum = signum
        name = signal.Signals(signum).name
        if self._in_evaluation:
            log.warning("%s: evaluation abandoned (--resume runs it again); saving a checkpoint (again to abort "
                        "now)", name)
            raise _EvaluationInterrupted
        log.warning("%s: stopping after this iteration and saving a checkpoint (again to abort now)", name)

    @contextlib.contextmanager
    def interruptible(self, enabled: bool = True) -> Iterator[None]:
        """A stop signal inside this block raises _EvaluationInterrupted (one process only: ranks of a
        distributed run must agree, so there the stop waits for the next step)."""
        self._in_evaluation = enabled
        try:
            yield
        finally:
            self._in_evaluation = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------
# the run


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) one training run; returns final metrics and output paths (same on every rank).

    Returned keys: `iterations`, `final_loss`, `metrics` (last evaluation or None), `best` (the best
    evaluation or None), `history` (all evaluations), `stopped_early` (iteration or None), `work_dir`,
    `log`, `checkpoint`, `weights` (model.safetensors), `best_weights` (best.safetensors or None),
    `config` (config.json), `curves`, `num_classes`, `classes`, `resumed_from`. Raises TrainingDiverged,
    TrainingInterrupted (after saving a checkpoint), WorkDirBusy (another run holds the work dir).
    """
    cfg = dataclasses.replace(cfg).validate()
    ctx = D.setup(cfg.device)
    lock = WorkDirLock(cfg.work_dir) if ctx.is_main else contextlib.nullcontext()
    try:
        with lock, _StopSignals() as stop:
            return _loop(setup(cfg, ctx), stop)
    finally:
        D.cleanup(ctx)


def _evaluate(run: Run, stop: _StopSignals, bar: Any, iteration: int) -> Tuple[bool, Optional[int]]:
    """The evaluation of `iteration`; (whether it ran to the end, the early-stop iteration or None)."""
    try:
        metrics = evaluate_run(run, iteration, stop.interruptible(not run.ctx.distributed))
    except _EvaluationInterrupted:
        return False, None
    finally:
        run.model.train()
    run.pending_eval = False
    if run.ctx.is_main:
        bar.write(f"iter {iteration}: mIoU {metrics['mIoU']:.2f} aAcc {metrics['aAcc']:.2f} "
                  f"mAcc {metrics['mAcc']:.2f}")
        _plot(run)
    early = run.cfg.early_stop and evaluations_without_improvement(run.history) >= run.cfg.early_stop
    return True, iteration if early else None


def _loop(run: Run, stop: _StopSignals) -> Dict[str, Any]:
    cfg, ctx, device = run.cfg, run.ctx, run.ctx.device
    bar = tqdm(total=cfg.iters, initial=run.start_iter, disable=not (ctx.is_main and cfg.progress),
               dynamic_ncols=True, desc="train", unit="it", position=0)
    window_time, window_data = 0.0, 0.0
    final_loss = math.nan
    stopped_early = None
    run.model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n_done = run.start_iter
    try:
        if run.pending_eval:  # the run was stopped before (or during) this iteration's evaluation: make it up
            done, stopped_early = _evaluate(run, stop, bar, n_done)
            if done:
                run.last_good = save_run(run, n_done)  # the checkpoint now holds the evaluation
            if stop.requested and not ctx.distributed:
                raise TrainingInterrupted(stop.signum or signal.SIGINT, n_done, run.last_good, run.pending_eval)
        t_last = time.perf_counter()
        for it in range(run.start_iter, cfg.iters if stopped_early is None else run.start_iter):
            n_done = it + 1
            images, labels = tuning.next_batches(run.batches, cfg.accum_steps)
            t_data = time.perf_counter() - t_last
            lr = run.optimizer.param_groups[0]["lr"]
            values, stopping = train_step(run, images, labels, n_done, stop.requested)
            # one process stops after the step the signal came in; ranks agree one step later (the flag
            # rides with the next step's loss all-reduce)
            stopping = stopping or (not ctx.distributed and stop.requested)
            final_loss = values["loss"]

            now = time.perf_counter()
            window_time += now - t_last
            window_data += t_data
            t_last = now
            run.window_n += 1
            for k, v in values.items():
                run.window[k] = run.window.get(k, 0.0) + v
            bar.update(1)
            if ctx.is_main and cfg.progress:
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
            if n_done % cfg.log_interval == 0 or n_done == cfg.iters or n_done == 1:
                if ctx.is_main:
                    # losses average the whole window (kept in checkpoints); times only what this process ran
                    timed = max(1, min(run.window_n, n_done - run.start_iter))
                    per_iter = window_time / timed
                    _append_jsonl(run.log_path, {
                        "mode": "train", "iter": n_done, "lr": lr,
                        **{k: v / run.window_n for k, v in run.window.items()},
                        "time": per_iter, "data_time": window_data / timed,
                        "memory_mb": round(_memory_mb(device), 1), "eta_s": round(per_iter * (cfg.iters - n_done), 1)},
                        run.tb)
                run.window, run.window_n, window_time, window_data = {}, 0, 0.0, 0.0

            run.pending_eval = run.val_set is not None and (n_done % cfg.eval_every == 0 or n_done == cfg.iters)
            if run.pending_eval and not stopping:
                _, stopped_early = _evaluate(run, stop, bar, n_done)
                stopping = stopping or (not ctx.distributed and stop.requested)  # a signal during the evaluation
                t_last = time.perf_counter()  # evaluation time is not iteration time
            if stopping or stopped_early or n_done % cfg.checkpoint_every == 0 or n_done == cfg.iters:
                run.last_good = save_run(run, n_done)
                stopping = stopping or (not ctx.distributed and stop.requested)  # a signal during the write
                t_last = time.perf_counter()
            if stopping:
                raise TrainingInterrupted(stop.signum or signal.SIGINT, n_done, run.last_good, run.pending_eval)
            if stopped_early:
                break
        if stopped_early and ctx.is_main:
            best = run.best
            bar.write(f"early stop at iteration {stopped_early}: {cfg.early_stop} evaluations without a better "
                      f"mIoU than {best['mIoU']:.2f} (iteration {best['iter']})")
    finally:
        bar.close()
        if run.tb is not None:
            run.tb.close()

    if ctx.is_main:
        save_weights_file(run, run.weights_path, n_done)
        _plot(run)
    D.barrier(ctx)
    if run.last_good is None:
        found = ckpt.list_checkpoints(run.work)
        run.last_good = found[0][1] if found else None
    return {
        "iterations": n_done, "final_loss": final_loss, "metrics": run.history[-1] if run.history else None,
        "best": run.best, "history": run.history, "stopped_early": stopped_early, "work_dir": str(run.work),
        "log": str(run.log_path), "checkpoint": str(run.last_good) if run.last_good else None,
        "weights": str(run.weights_path), "best_weights": str(run.best_path) if run.best_path.is_file() else None,
        "config": str(run.work / "config.json"), "curves": str(run.curves_path),
        "num_classes": int(run.train_set.num_classes), "classes": list(run.train_set.classes),
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
    }


def finetune(model: str, data: str, work_dir: Optional[str] = None, **options: Any) -> Dict[str, Any]:
    """Fine-tune zoo model `model` on a custom folder dataset (`data/images/train`, `data/masks/train`, ...).

    `options` are `TrainConfig` fields, named like `isa train`'s flags (`iters`, `crop_size=(H, W)`,
    `batch_size`, `lr`, `weights`, `num_classes`, `img_scale=(W, H)`, `test_scale`, `early_stop`, ...).
    Only the classifiers are re-initialised when the dataset's class count differs. Returns what
    `train` returns (final `metrics` on the val split when there is one, `weights` path, ...).

    Example:
        >>> result = finetune("isanet_r50-d8_512x512_20k_voc12aug", "my_data", "runs/ft",  # doctest: +SKIP
        ...                   iters=50, crop_size=(64, 64), batch_size=2, weights=None, device="cpu")
        >>> result["metrics"]["mIoU"]                                                      # doctest: +SKIP
        41.3
    """
    if work_dir is not None:
        options["work_dir"] = str(work_dir)
    return train(TrainConfig.for_finetune(model, data, **options))
