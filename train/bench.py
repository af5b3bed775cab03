"""`isa bench data`: the recipe training pipeline's time per sample on one core, and the loader's throughput.

- `make_benchmark_data(root, "cityscapes" | "ade20k", n)` writes a small dataset in the real layout with
  photo-like content at the real sizes: Cityscapes 2048x1024 RGB PNGs (about 2.5 MB each; real
  `leftImg8bit` files are 2-2.5 MB) with trainId masks; ADE20K JPEGs (quality 90, sizes around 683x512) with
  0..150 masks (reduce_zero_label).
- `bench_data(recipe, data_root, workers)` times the training pipeline exactly as `isa train` builds it
  (decoding included, up to the collated uint8 batch): with `workers=0` one process on one thread, per
  sample after a warm-up over the dataset's first images (median and mean); with `workers=N` the
  DataLoader's samples per second. MMSegmentation's own pipeline is timed beside it by
  `tools/mmseg_pipeline_reference.py` (its own environment).

Example:
    >>> root = make_benchmark_data("/tmp/cs", "cityscapes", num_images=2)        # doctest: +SKIP
    >>> bench_data("isanet_r50-d8_512x1024_40k_cityscapes", root, samples=4)["ms_per_sample"]  # doctest: +SKIP
    24.4
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

PathLike = Union[str, "os.PathLike[str]"]

CITYSCAPES_SIZE_WH = (2048, 1024)
ADE_SIZES_WH = ((683, 512), (512, 683), (768, 512), (1024, 512))  # ADE20K-like shapes, short side ~512


def _photo(rng: np.random.Generator, h: int, w: int, noise: float = 1.2) -> np.ndarray:
    """A photo-like RGB image: smooth gradients, flat objects with edges, mild sensor noise (compresses
    like a camera image: a 2048x1024 PNG is about 2.5 MB)."""
    yy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    img = np.full((h, w, 3), 128.0, dtype=np.float32)
    for _ in range(6):
        fy, fx = rng.uniform(0.5, 8.0, 2)
        phase, amp = rng.uniform(0, 6.3, 3), rng.uniform(10, 40, 3)
        wave = 2 * np.pi * (fy * yy + fx * xx)
        for c in range(3):
            img[..., c] += amp[c] * np.sin(wave + phase[c])
    for _ in range(40):
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        img[y0:y0 + int(rng.integers(10, h // 3)), x0:x0 + int(rng.integers(10, w // 4))] += rng.uniform(-60, 60, 3)
    img += rng.normal(0.0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _label_map(rng: np.random.Generator, h: int, w: int, labels: Sequence[int], ignore: Optional[int]) -> np.ndarray:
    """Large regions (a street-scene-like layout: bands, then boxes), some ignored pixels."""
    mask = np.empty((h, w), dtype=np.uint8)
    bands = sorted(rng.choice(np.arange(1, 8), 3, replace=False))
    edges = [0] + [h * b // 8 for b in bands] + [h]
    for top, bottom in zip(edges[:-1], edges[1:]):
        mask[top:bottom] = rng.choice(labels)
    for _ in range(25):
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        mask[y0:y0 + int(rng.integers(8, h // 4)), x0:x0 + int(rng.integers(8, w // 6))] = rng.choice(labels)
    if ignore is not None:
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        mask[y0:y0 + h // 10, x0:x0 + w // 10] = ignore
    return mask


def make_benchmark_data(root: PathLike, dataset: str = "cityscapes", num_images: int = 8, seed: int = 0) -> Path:
    """Write `num_images` training pairs in the layout `eval.datasets` (and MMSegmentation) read; returns
    the data root to pass as `--data-root` (for ADE20K, the ADEChallengeData2016 folder)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    if dataset == "cityscapes":
        image_dir, mask_dir = root / "leftImg8bit" / "train" / "bench", root / "gtFine" / "train" / "bench"
    elif dataset == "ade20k":
        root = root / "ADEChallengeData2016"
        image_dir, mask_dir = root / "images" / "training", root / "annotations" / "training"
    else:
        raise ValueError(f"benchmark data: dataset must be cityscapes or ade20k, got {dataset!r}")
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        if dataset == "cityscapes":
            w, h = CITYSCAPES_SIZE_WH
            name = f"bench_{i:06d}_000019"
            Image.fromarray(_photo(rng, h, w)).save(image_dir / f"{name}_leftImg8bit.png")
            mask = _label_map(rng, h, w, list(range(19)), 255)
            Image.fromarray(mask).save(mask_dir / f"{name}_gtFine_labelTrainIds.png")
        else:
            w, h = ADE_SIZES_WH[i % len(ADE_SIZES_WH)]
            name = f"ADE_train_{i:08d}"
            Image.fromarray(_photo(rng, h, w)).save(image_dir / f"{name}.jpg", quality=90)
            # stored labels 1..150 are classes, 0 is "other" (ignored after reduce_zero_label)
            Image.fromarray(_label_map(rng, h, w, list(range(0, 151)), None)).save(mask_dir / f"{name}.png")
    return root


def _reader_and_pipeline(recipe: str, data_root: PathLike, reference: bool = False, folder: bool = False,
                         crop_size: Optional[Tuple[int, int]] = None) -> Tuple[Any, Any, Any]:
    from eval.datasets import build_dataset

    from .config import TrainConfig
    from .data import TrainSet
    from .pipeline import RecipePipeline
    from .transforms import build_train_transforms

    extra = {"crop_size": tuple(crop_size)} if crop_size else {}
    # a folder dataset is read and augmented as `isa train --model NAME --data DIR` does (fine-tuning defaults)
    cfg = (TrainConfig.for_finetune(recipe, str(data_root), **extra) if folder
           else TrainConfig.from_recipe(recipe, str(data_root), **extra))
    reader = build_dataset(cfg.dataset, str(data_root), cfg.train_split)
    if reference:
        pipeline = build_train_transforms(cfg.crop_size, cfg.img_scale, cfg.ratio_range, cfg.cat_max_ratio)
    else:
        pipeline = RecipePipeline(cfg.crop_size, cfg.img_scale, cfg.ratio_range, cfg.cat_max_ratio)
    return cfg, reader, TrainSet(reader, pipeline)  # TrainSet builds the HSV tables (not timed)


def bench_data(recipe: str, data_root: PathLike, workers: int = 0, samples: int = 24, warmup: int = 4,
               batch_size: int = 2, seed: int = 0, reference: bool = False, folder: bool = False,
               crop_size: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    """Time the recipe's training pipeline as `isa train` runs it (decoding included).

    `workers=0`: one process on one thread; `warmup` samples first (the dataset's first images), then
    `samples` timed one by one: `ms_per_sample` is their median (`ms_mean` the mean). `workers=N`: the
    DataLoader with N worker processes, `samples` (rounded up to whole batches) timed after `warmup`
    batches: `samples_per_s` and `ms_per_sample` = 1000 / samples_per_s. `reference`: the reference
    pipeline (`train.transforms`, Pillow decoding, normalising in the worker) instead of the fast one.
    `folder`: `data_root` is a folder dataset (DIR/images/train, ...) read with variant `recipe`'s
    fine-tuning settings, as `isa train --model RECIPE --data DIR`; `crop_size` (H, W) replaces the crop.
    """
    from .data import IterationBatchSampler, build_loader, collate, sample_seed

    cfg, reader, train_set = _reader_and_pipeline(recipe, data_root, reference, folder, crop_size)
    result: Dict[str, Any] = {"recipe": recipe, "dataset": cfg.dataset, "data_root": str(data_root),
                              "pipeline": "reference" if reference else "fast", "images": len(reader),
                              "crop_size": list(cfg.crop_size), "workers": workers, "torch": torch.__version__,
                              "cpus": os.cpu_count()}
    if workers == 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            keys = [(i % len(reader), sample_seed(seed, 0, i)) for i in range(warmup + samples)]
            for key in keys[:warmup]:
                train_set[key]
            times = []
            for key in keys[warmup:]:
                start = time.perf_counter()
                collate([train_set[key]])
                times.append((time.perf_counter() - start) * 1e3)
        finally:
            torch.set_num_threads(threads)
        result.update(ms_per_sample=statistics.median(times), ms_mean=statistics.mean(times),
                      samples_per_s=1e3 / statistics.mean(times), ms_all=times)
        return result
    sampler = IterationBatchSampler(len(reader), batch_size, seed=seed)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    loader = iter(build_loader(train_set, sampler, num_workers=workers))
    warm = max(warmup, 1)
    for _ in range(warm):  # worker start-up and the first batches are not timed
        next(loader)
    batches = -(-samples // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    del loader  # the workers exit (and are waited for), so their CPU time is counted below
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # every sample the workers made: warm-up, timed, and the prefetched ones (2 batches a worker)
    made = (warm + batches + 2 * workers) * batch_size
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rate = batches * batch_size / seconds
    result.update(batch_size=batch_size, samples=batches * batch_size, seconds=seconds, samples_per_s=rate,
                  ms_per_sample=1e3 / rate, worker_cpu_ms_per_sample=1e3 * cpu / made,
                  loadavg=list(os.getloadavg()))
    return result


def format_result(result: Dict[str, Any]) -> str:
    """One table row per result: recipe, pipeline, workers, ms per sample, samples per second."""
    workers = result["workers"]
    where = "1 process, 1 thread" if workers == 0 else f"DataLoader, {workers} worker{'s' * (workers > 1)}"
    extra = f"  (mean {result['ms_mean']:.1f} ms)" if "ms_mean" in result else ""
    if "worker_cpu_ms_per_sample" in result:
        extra = f"  (worker CPU {result['worker_cpu_ms_per_sample']:.1f} ms/sample, load {result['loadavg'][0]:.1f})"
    return (f"{result['recipe']:<42} {result.get('pipeline', 'fast'):<9} {where:<24} {result['ms_per_sample']:8.1f} ms/sample "
            f"{result['samples_per_s']:7.1f} samples/s{extra}")
