"""Where a training sample's time goes on one core: the native loops and the decoders timed inside the
pipeline as `isa train` runs it (a profile, not a benchmark: the wrappers add a little time).

    python scripts/profile_train_data.py ade20k|cityscapes DATA_ROOT   # data from `isa bench data --make-data N`
"""
import sys
import time

import torch

from eval.datasets import ADE20KDataset, CityscapesDataset
from train import decode, native, pipeline
from train import data as train_data
from train.data import TrainSet
from train.pipeline import RecipePipeline

seconds = {}


def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return wrapper


class TimedLibrary:
    def __init__(self, lib):
        self.lib = lib

    def __getattr__(self, name):
        return timed(name, getattr(self.lib, name))


def main(dataset: str, root: str, samples: int = 64) -> None:
    torch.set_num_threads(1)
    if dataset == "ade20k":
        reader, recipe = ADE20KDataset(root, "train"), RecipePipeline((512, 512), (2048, 512))
    else:
        reader, recipe = CityscapesDataset(root, "train"), RecipePipeline((512, 1024), (2048, 1024))
    train_set = TrainSet(reader, recipe)
    lib = TimedLibrary(native.library())
    pipeline.native.library = decode.native.library = lambda: lib
    decode._decode_jpeg = timed("JPEG decode (header check, torchvision)", decode._decode_jpeg)
    decode.images.png_header = timed("PNG header checks (chunks, CRCs)", decode.images.png_header)
    train_data.open_image = timed("image open (read, header checks; JPEG decode)", train_data.open_image)
    train_data.open_mask = timed("mask open (read, header checks)", train_data.open_mask)
    decode.PngRows.rows = timed("PNG rows (inflate + unfilter)", decode.PngRows.rows)
    for i in range(8):
        train_set[(i % len(reader), i)]
    seconds.clear()
    start = time.perf_counter()
    for i in range(samples):
        train_set[(i % len(reader), 100 + i)]
    total = (time.perf_counter() - start) / samples * 1e3
    print(f"{dataset}: {total:.2f} ms a sample, {samples} samples")
    counted = 0.0
    for name, s in seconds.items():
        ms = s / samples * 1e3
        counted += 0.0 if name in ("png_unfilter", "JPEG decode (torchvision)") else ms  # inside others
        print(f"  {name:32s} {ms:7.3f} ms")
    print(f"  {'the rest (Python, allocation)':32s} {total - counted:7.3f} ms")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:4]))
