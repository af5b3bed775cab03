"""The iteration-based data stream: DistributedSampler split, per-sample seeds, exact data position."""
from __future__ import annotations

import itertools

import torch
from torchvision import tv_tensors

from train.data import IterationBatchSampler, TrainSet, collate
from train.transforms import build_train_transforms


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_two_ranks_of_batch_2_draw_what_one_process_of_batch_4_draws():
    single = _take(IterationBatchSampler(10, 4, seed=3), 5)
    ranks = [_take(IterationBatchSampler(10, 2, seed=3, world_size=2, rank=r), 5) for r in range(2)]
    for step in range(5):
        assert sorted(single[step]) == sorted(ranks[0][step] + ranks[1][step])


def test_epochs_are_distributed_sampler_permutations_with_the_epoch_as_seed_offset():
    batches = _take(IterationBatchSampler(6, 3, seed=5), 4)
    indices = [i for batch in batches for i, _ in batch]
    g0, g1 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)  # seed + epoch
    assert indices == torch.randperm(6, generator=g0).tolist() + torch.randperm(6, generator=g1).tolist()


def test_resuming_at_iteration_t_continues_the_same_stream():
    full = _take(IterationBatchSampler(7, 3, seed=1), 9)  # crosses epoch boundaries mid-batch
    resumed = _take(IterationBatchSampler(7, 3, seed=1, start_iteration=4), 5)
    assert resumed == full[4:]


def test_sample_seeds_differ_between_samples_and_epochs():
    batches = _take(IterationBatchSampler(4, 4, seed=0), 2)
    seeds = [s for batch in batches for _, s in batch]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)


class _Reader:
    num_classes, ignore_index = 3, 255

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.items = [(tv_tensors.Image(torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=g)),
                       tv_tensors.Mask(torch.randint(0, 3, (50, 70), dtype=torch.uint8, generator=g)))
                      for _ in range(3)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return (*self.items[i], {})


def test_train_set_augmentation_depends_only_on_the_sample_seed_and_spares_the_global_rng():
    ts = TrainSet(_Reader(), build_train_transforms((32, 32), (128, 32)))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = ts[(1, 42)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    torch.manual_seed(999)
    b = ts[(1, 42)]
    c = ts[(1, 43)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (3, 32, 32) and a[1].dtype == torch.int64
    images, labels = collate([a, c])
    assert images.shape == (2, 3, 32, 32) and labels.shape == (2, 32, 32)


def test_train_set_maps_a_custom_ignore_index_to_255():
    reader = _Reader()
    reader.ignore_index = 7
    reader.items = [(reader.items[0][0], tv_tensors.Mask(torch.full((50, 70), 7, dtype=torch.uint8)))]
    ts = TrainSet(reader, build_train_transforms((32, 32), (70, 50), ratio_range=(1.0, 1.0), photometric=False))
    _, label = ts[(0, 1)]
    assert torch.all(label == 255)


def test_train_set_with_the_fast_pipeline_hands_over_uint8_that_normalises_to_the_reference():
    from train.pipeline import RecipePipeline, normalize_batch

    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    fast = TrainSet(_Reader(), RecipePipeline((32, 32), (128, 32)))
    ref = TrainSet(_Reader(), build_train_transforms((32, 32), (128, 32), mean=mean, std=std))
    batch = collate([fast[(i, 40 + i)] for i in range(3)])
    assert batch[0].dtype == torch.uint8 and batch[1].dtype == torch.int16
    images, labels = normalize_batch(*batch, mean, std)
    want = collate([ref[(i, 40 + i)] for i in range(3)])
    assert torch.equal(images, want[0]) and torch.equal(labels, want[1])
