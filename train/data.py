"""Iteration-based data stream: DistributedSampler epochs, per-sample seeds, exact data position.

The stream of a run is a pure function of (seed, world size, per-GPU batch, iteration):

- each epoch is `DistributedSampler(shuffle=True, seed=seed).set_epoch(e)`'s index list for the rank;
- rank r takes its next `batch_size` indices from that list, running on into the next epoch when one
  ends (IterBasedRunner's endless loader);
- sample k of the rank's epoch list sits at position `r + k * world_size` of the epoch's global
  order, and its augmentation is seeded with `sample_seed(seed, epoch, position)`, so two ranks with
  batch B draw exactly the samples and augmentations one process with batch 2B draws.

Resuming at iteration t needs nothing but t: the sampler skips `t * batch_size` of the rank's items.

Example:
    >>> s = IterationBatchSampler(num_samples=5, batch_size=2, seed=0)
    >>> it = iter(s); [index for index, _ in next(it)] + [index for index, _ in next(it)]
    [4, 0, 1, 3]
"""
from __future__ import annotations

import functools
import signal
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from zoo.images import MAX_PIXELS

from .decode import PngRows, open_image, open_mask
from .pipeline import Labels, RecipePipeline

IGNORE_INDEX = 255
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the augmentation of the sample at `position` of `epoch`'s global order."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (epoch & _MASK64))
    h = _splitmix64(h ^ (position & _MASK64))
    return h >> 1


class _Range(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class IterationBatchSampler(Sampler):
    """Endless batches of `(dataset_index, sample_seed)` for one rank, starting at `start_iteration`."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, world_size: int = 1,
                 rank: int = 0, start_iteration: int = 0, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("the training set is empty")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.start_iteration = start_iteration
        self.sampler = DistributedSampler(_Range(num_samples), num_replicas=world_size, rank=rank,
                                          shuffle=shuffle, seed=seed, drop_last=False)
        self.per_epoch = len(self.sampler)

    def position(self, iteration: int) -> Tuple[int, int]:
        """(epoch, offset into this rank's epoch list) before 0-based `iteration` runs."""
        return divmod(iteration * self.batch_size, self.per_epoch)

    def _epoch(self, epoch: int) -> List[int]:
        self.sampler.set_epoch(epoch)
        return list(self.sampler)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        epoch, offset = self.position(self.start_iteration)
        indices = self._epoch(epoch)
        batch: List[Tuple[int, int]] = []
        while True:
            if offset == len(indices):
                epoch, offset = epoch + 1, 0
                indices = self._epoch(epoch)
            global_position = self.rank + offset * self.world_size
            batch.append((indices[offset], sample_seed(self.seed, epoch, global_position)))
            offset += 1
            if len(batch) == self.batch_size:
                yield batch
                batch = []


class TrainSet(Dataset):
    """Wraps an `eval.datasets` reader: `[(index, seed)] -> (image, label)` through `transforms`.

    With a `train.pipeline.RecipePipeline` (what training uses) the files are opened for the pipeline to
    decode as far as it reads (`train.decode.open_image` / `open_mask`, after the reader's header checks:
    RGB PNGs as `PngRows`, JPEGs decoded whole and turned upright), the stored mask values go through the
    reader's own mapping as a 256-entry table, and the sample is `(uint8 (3, h, w), int16 (h, w))` to be
    finished by `normalize_batch` on the device. Any file this path declines or refuses, or a value the
    reader would refuse, goes through the reader itself (`zoo.images.read_image`, and its named errors).
    With the reference v2 pipeline (`build_train_transforms`) the sample is `(float (3, h, w), int64 (h, w))`,
    as the reader returns it.

    The transform runs under `torch.random.fork_rng` seeded with the sample's seed, so it neither
    reads nor disturbs the caller's RNG. A reader whose ignore_index is not 255 is remapped to 255,
    the value the loss and the pad use.
    """

    def __init__(self, base: Any, transforms: Any):
        self.base = base
        self.transforms = transforms
        self.fast = isinstance(transforms, RecipePipeline)
        self.ignore_index = int(getattr(base, "ignore_index", IGNORE_INDEX))
        num_classes = int(getattr(base, "num_classes", 0))
        if num_classes > IGNORE_INDEX:
            raise ValueError(f"{num_classes} classes collide with the ignore label 255 used in training")
        if self.fast:
            transforms.warm_up()  # tables and the native loops, once, shared by forked workers

    def __len__(self) -> int:
        return len(self.base)

    def _sources(self, index: int) -> Optional[Tuple[Any, Labels]]:
        """The image (tensor or PNG rows) and `Labels` of sample `index` for the fast pipeline, or None
        where only the reader can read them."""
        base = self.base
        if not (hasattr(base, "load_mask") and hasattr(base, "samples")):
            return None
        sample = base.samples[index]
        image = open_image(sample.image_path, self._max_pixels())
        if image is None:
            return None
        labels = self._labels(index)
        image_hw = image.size_hw if isinstance(image, PngRows) else tuple(image.shape[-2:])
        return (image, labels) if labels is not None and tuple(image_hw) == labels.size_hw else None

    def _labels(self, index: int) -> Optional[Labels]:
        """The stored 8-bit mask with the reader's mapping (`reduce_zero_label_`, the ignore index to 255)
        as a table; masks the reader maps otherwise (label_map, colour palettes) are read by it."""
        base = self.base
        if base.meta.label_map or getattr(base, "mask_palette", None) is not None:
            mask = base.load_mask(index)
            if self.ignore_index != IGNORE_INDEX:
                mask = mask.masked_fill(mask == self.ignore_index, IGNORE_INDEX)
            return Labels(mask.to(torch.uint8))  # values < 256: classes <= 255, ignore 255
        lut, valid = _label_table(bool(base.reduce_zero_label), self.ignore_index, int(base.num_classes))
        stored = open_mask(base.samples[index].mask_path, self._max_pixels())
        return None if stored is None else Labels(stored, lut, valid)

    def _max_pixels(self) -> Optional[int]:
        return getattr(self.base, "max_pixels", MAX_PIXELS)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        if self.fast:
            try:
                sources = self._sources(index)
                if sources is not None:
                    return self._transform(seed, *sources)
            except ValueError:  # ImageError, InvalidLabels, a corrupt stream: the reader below names it
                pass
        image, mask, meta = self.base[index]
        if self.ignore_index != IGNORE_INDEX:
            mask = mask.masked_fill(mask == self.ignore_index, IGNORE_INDEX)
        if self.fast and mask.dtype != torch.uint8:
            mask = mask.to(torch.uint8)  # values are now < 256 (classes <= 255, ignore 255)
        try:
            image, label = self._transform(seed, image, mask)
        except ValueError as err:  # e.g. a resize to a side of 0: name the file
            raise ValueError(f"{meta.get('image_path', f'sample {index}')}: {err}") from err
        return image, (label if self.fast else label.to(torch.int64))

    def _transform(self, seed: int, image: Any, mask: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            # the CPU generator is all the transforms draw from (torch.manual_seed would also queue seeds
            # for every lazily initialised device, a stack trace each: a tenth of an ADE20K sample's time)
            torch.default_generator.manual_seed(seed)
            image, mask = self.transforms(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


@functools.lru_cache(maxsize=8)
def _label_table(reduce_zero_label: bool, ignore_index: int, num_classes: int
                 ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """(label of each stored 8-bit value, the ignore index mapped to 255, or None for the identity;
    whether each stored value is valid)."""
    from eval.metrics import reduce_zero_label_

    stored = torch.arange(256)
    label = reduce_zero_label_(stored, ignore_index) if reduce_zero_label else stored
    valid = ((label >= 0) & (label < num_classes)) | (label == ignore_index)
    if not reduce_zero_label and ignore_index == IGNORE_INDEX:
        return None, valid
    label = label.masked_fill(label == ignore_index, IGNORE_INDEX)
    return label.clamp(0, 255).to(torch.uint8), valid


def collate(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, label) pairs; every crop is padded to the crop size so shapes agree."""
    images, labels = zip(*batch)
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) != 1:
        raise ValueError(f"train crops differ in shape {sorted(shapes)}: the pipeline must end with PadToSize")
    # default_collate stacks straight into shared memory in a worker (torch.stack would need a second copy
    # there to cross to the main process)
    return default_collate(list(images)), default_collate(list(labels))


def _ignore_interrupts(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process stops the run cleanly and then ends its
    # workers; a worker dying of it first would turn that clean stop into a "worker exited" error
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(train_set: TrainSet, batch_sampler: IterationBatchSampler, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """DataLoader over the endless batch sampler; its own generator keeps the global RNG untouched.

    The sampler never ends, so the workers already live as long as the run (`persistent_workers` would
    change nothing); pin_memory (on CUDA) lets the uint8 batches go to the device asynchronously.
    """
    return DataLoader(train_set, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, generator=torch.Generator(), worker_init_fn=_ignore_interrupts,
                      persistent_workers=False, prefetch_factor=2 if num_workers > 0 else None)
