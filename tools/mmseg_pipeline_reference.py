#!/usr/bin/env python
"""MMSegmentation 1.2.2's training pipeline timed per sample on one core, beside ours (`isa bench data`).

Two modes (see tools/MMSEG_REFERENCE.md for the environment):

  # MMSeg alone, in its own environment: the recipe's 1.x `train_pipeline` (LoadImageFromFile, LoadAnnotations,
  # RandomResize, RandomCrop, RandomFlip, PhotoMetricDistortion, PackSegInputs) built from the installed
  # config, one thread (cv2 and torch), numpy seeded per sample; prints JSON with ms_per_sample
  /work/mmseg_env/bin/python tools/mmseg_pipeline_reference.py time --recipe NAME --data-root DIR

  # side by side in one run: alternating rounds of MMSeg's pipeline and ours (`python -m isa bench data
  # --workers 0`), each round a fresh process pinned to the same core; medians over rounds, and the ratio
  /work/mmseg_env/bin/python tools/mmseg_pipeline_reference.py compare --recipe NAME --data-root DIR \
      --ours-python .venv/bin/python --rounds 5 --json OUT.json

`time --steps` also times each transform separately (sums of per-step medians need not add up exactly).
"""
import argparse
import json
import warnings
import os
import statistics
import subprocess
import sys
import time

warnings.filterwarnings('ignore', message='.*MultiScaleDeformableAttention.*')

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VARIANTS_CANDIDATES = [
    os.path.join(REPO, '..', 'shared', 'spec', 'variants.json'),
    '/work/shared/spec/variants.json',
    os.path.join(REPO, 'zoo', 'variants.json'),
]


def load_variant(name):
    for p in VARIANTS_CANDIDATES:
        if os.path.exists(p):
            with open(p) as f:
                for v in json.load(f)['variants']:
                    if v['name'] == name:
                        return v
            raise KeyError(f'{name} is not in {p}')
    raise FileNotFoundError('variants.json not found in ' + ', '.join(VARIANTS_CANDIDATES))


def list_samples(variant, data_root):
    """(img_path, seg_map_path) pairs in MMSeg's order (sorted names), for Cityscapes and ADE20K layouts."""
    dataset = variant['dataset'].lower()
    if dataset == 'cityscapes':
        img_dir = os.path.join(data_root, 'leftImg8bit', 'train')
        seg_dir = os.path.join(data_root, 'gtFine', 'train')
        img_suffix, seg_suffix = '_leftImg8bit.png', '_gtFine_labelTrainIds.png'
    elif dataset == 'ade20k':
        if not os.path.isdir(os.path.join(data_root, 'images')):
            data_root = os.path.join(data_root, 'ADEChallengeData2016')
        img_dir = os.path.join(data_root, 'images', 'training')
        seg_dir = os.path.join(data_root, 'annotations', 'training')
        img_suffix, seg_suffix = '.jpg', '.png'
    else:
        raise ValueError(f"no sample lister for dataset {variant['dataset']}")
    rel = []
    for d, _, files in os.walk(img_dir):
        rel += [os.path.relpath(os.path.join(d, f), img_dir) for f in files if f.endswith(img_suffix)]
    rel.sort()
    return [(os.path.join(img_dir, r), os.path.join(seg_dir, r[:-len(img_suffix)] + seg_suffix)) for r in rel]


def build_pipeline(variant):
    """The recipe's train_pipeline from MMSeg's own installed 1.x config, as a list of transforms."""
    import mmseg
    from mmengine.config import Config
    from mmseg.registry import TRANSFORMS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    path = os.path.join(os.path.dirname(mmseg.__file__), '.mim', 'configs', 'isanet',
                        variant['mmseg_1x_config_name'] + '.py')
    cfg = Config.fromfile(path)
    steps = cfg.train_dataloader.dataset.pipeline
    return [TRANSFORMS.build(s) for s in steps], [s['type'] for s in steps]


def run_time(args):
    import cv2
    import numpy as np
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    variant = load_variant(args.recipe)
    transforms, names = build_pipeline(variant)
    samples = list_samples(variant, args.data_root)
    if not samples:
        raise SystemExit(f'no training images under {args.data_root}')
    reduce_zero = bool(variant.get('reduce_zero_label'))

    def one(i, steps=None):
        img_path, seg_path = samples[i % len(samples)]
        results = dict(img_path=img_path, seg_map_path=seg_path, reduce_zero_label=reduce_zero, seg_fields=[],
                       label_map=None)
        np.random.seed((args.seed * 1000003 + i) % 2**32)  # MMSeg's transforms draw from numpy's global RNG
        start = time.perf_counter()
        for t, name in zip(transforms, names):
            s = time.perf_counter()
            results = t(results)
            if steps is not None:
                steps.setdefault(name, []).append((time.perf_counter() - s) * 1e3)
        return (time.perf_counter() - start) * 1e3

    for i in range(min(args.warmup, len(samples))):  # warm-up over the dataset's first images
        one(i)
    steps = {} if args.steps else None
    times = [one(i, steps) for i in range(args.samples)]
    out = dict(pipeline='mmseg', recipe=args.recipe, mmseg=__import__('mmseg').__version__, cv2=cv2.__version__,
               samples=len(times), ms_per_sample=statistics.median(times), ms_mean=statistics.mean(times),
               ms_all=times, transforms=names)
    if steps is not None:
        out['steps_ms_median'] = {k: statistics.median(v) for k, v in steps.items()}
    print(json.dumps(out))


def _pin(cpu):
    return ['taskset', '-c', str(cpu)] if cpu is not None else []


def run_compare(args):
    """Alternate MMSeg and ours, each round a fresh single-core process; medians over rounds."""
    ours_cmd = [args.ours_python, '-m', 'isa', 'bench', 'data', '--recipe', args.recipe, '--data-root',
                args.data_root, '--workers', '0', '--samples', str(args.samples), '--warmup', str(args.warmup)]
    mmseg_cmd = [sys.executable, os.path.abspath(__file__), 'time', '--recipe', args.recipe, '--data-root',
                 args.data_root, '--samples', str(args.samples), '--warmup', str(args.warmup)]
    runs = [('mmseg', mmseg_cmd), ('ours', ours_cmd)]
    if args.with_reference:  # our reference pipeline (train.transforms), the one the fast path replaces
        runs.append(('ours_reference', ours_cmd + ['--reference']))
    rounds = []
    for r in range(args.rounds):
        row = {}
        order = runs if r % 2 == 0 else runs[::-1]
        for who, cmd in order:
            proc = subprocess.run(_pin(args.cpu) + cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(f'{who} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
            row[who] = json.loads(proc.stdout.strip().splitlines()[-1])['ms_per_sample']
        row['ratio'] = row['ours'] / row['mmseg']
        rounds.append(row)
        ref = f"  ours (reference pipeline) {row['ours_reference']:.1f} ms" if 'ours_reference' in row else ''
        print(f"round {r + 1}: mmseg {row['mmseg']:.1f} ms  ours {row['ours']:.1f} ms  ours/mmseg {row['ratio']:.3f}"
              f"{ref}", flush=True)
    load = os.getloadavg()
    result = dict(recipe=args.recipe, data_root=args.data_root, cpu=args.cpu, samples_per_round=args.samples,
                  rounds=rounds, mmseg_ms_median=statistics.median(r['mmseg'] for r in rounds),
                  ours_ms_median=statistics.median(r['ours'] for r in rounds),
                  ratio_median=statistics.median(r['ratio'] for r in rounds), loadavg_after=load,
                  ours_reference_ms_median=(statistics.median(r['ours_reference'] for r in rounds)
                                            if args.with_reference else None),
                  time=time.strftime('%Y-%m-%d %H:%M:%S'))
    print(f"{args.recipe}: MMSeg {result['mmseg_ms_median']:.1f} ms/sample, ours {result['ours_ms_median']:.1f} "
          f"ms/sample -> ours/MMSeg {result['ratio_median']:.3f} (median of {args.rounds} alternating rounds, "
          f"one core; load average after {load[0]:.1f})")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)
        print(f'wrote {args.json}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='mode', required=True)
    for name in ('time', 'compare'):
        s = sub.add_parser(name)
        s.add_argument('--recipe', required=True, help='variant name, e.g. isanet_r50-d8_512x1024_40k_cityscapes')
        s.add_argument('--data-root', required=True)
        s.add_argument('--samples', type=int, default=24, help='timed samples (per round)')
        s.add_argument('--warmup', type=int, default=4, help='untimed samples first (the dataset\'s first images)')
    s = sub.choices['time']
    s.add_argument('--seed', type=int, default=0)
    s.add_argument('--steps', action='store_true', help='also time each transform')
    s = sub.choices['compare']
    s.add_argument('--ours-python', default=os.path.join(REPO, '.venv', 'bin', 'python'))
    s.add_argument('--rounds', type=int, default=5)
    s.add_argument('--cpu', type=int, default=0, help='core to pin both to (taskset); -1: no pinning')
    s.add_argument('--with-reference', action='store_true',
                   help='also time our reference pipeline (isa bench data --reference) in each round')
    s.add_argument('--json', help='write the rounds and medians here')
    args = p.parse_args(argv)
    if args.mode == 'time':
        run_time(args)
    else:
        args.cpu = None if args.cpu < 0 else args.cpu
        run_compare(args)


if __name__ == '__main__':
    main()
