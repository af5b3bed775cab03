#!/usr/bin/env python
"""MMSegmentation 1.2.2's losses and OHEM sampler on seeded inputs: the reference of tests/test_train_losses.py.

Run in the side environment (tools/MMSEG_REFERENCE.md), from the repository root:

    /work/mmseg_env/bin/python tools/mmseg_loss_reference.py [--out tests/data/mmseg_losses/reference.safetensors]

It imports `mmseg.models.losses` (CrossEntropyLoss, DiceLoss, FocalLoss, LovaszLoss) and
`mmseg.structures.sampler.OHEMPixelSampler` from the installed mmsegmentation 1.2.2 - nothing of this
project - and writes float64 seeded logits (2, 4, 9, 11), labels with ignored (255) pixels (class 3 absent
from image 1, so `classes='present'` and per-image terms differ) and class weights, then per case the
module's value (`CASE.loss`) and its gradient w.r.t. the logits (`CASE.grad`); OHEM cases also the
sampler's weight map (`CASE.weight`). The safetensors metadata `cases` holds each case's module type and
keyword arguments, so the test builds the same terms through `train.losses.build_loss`.

What is called, per case (the loss as MMSeg's decode head calls it: `loss(logits, labels, weight=...,
ignore_index=255)`):
- ce, ce_avg_non_ignore: `CrossEntropyLoss(avg_non_ignore=...)` as is.
- ce_class_weight, ce_class_weight_avg_non_ignore: 1.2.2 raises IndexError with class weights and ignored
  pixels (`class_weight[cls]` for cls=255; #3734, #3492) - the tool checks that it does - so the value is
  MMSeg's same module called with `avg_factor=` the sum of the class weights of the non-ignored pixels, the
  average PR #3457 makes it compute.
- dice_*: `DiceLoss(...)` as is (sigmoid default; softmax naive with eps=1; ignore_index=0 dropping a channel).
- focal, focal_weighted: 1.2.2's CPU path targets `one_hot[:, num_classes]` (one column; a shape RuntimeError
  follows); its CUDA path calls
  mmcv's CUDA `sigmoid_focal_loss` (not in mmcv-lite). The value is MMSeg's `py_sigmoid_focal_loss` given
  what the CUDA path gives its kernel: the one-hot target `one_hot(label, K+1)[:, :K]` of each pixel with
  ignored pixels set to class 0, and the valid mask; the tool cross-checks it against a transcription of
  mmcv's CUDA kernel formula (`sigmoid_focal_loss_cuda_kernel.cuh`: -alpha (1-p)^g log p for the target
  class, -(1-alpha) p^g log(1-p) otherwise) run through MMSeg's `sigmoid_focal_loss` wrapper.
- lovasz_batch: `LovaszLoss(per_image=False, reduction='none')` (1.2.2 asserts 'none' there; the value is
  one number; 1.2.2's Lovasz only runs in float32, so these cases take the float32 cast of the logits and
  their gradient is w.r.t. the float64 logits through that cast); lovasz_per_image: `per_image=True,
  reduction='mean'`; lovasz_all_weighted: classes='all', per image, summed, with class weights.
- ohem_thresh, ohem_thresh_min_kept, ohem_topk: `OHEMPixelSampler(context, thresh, min_kept).sample(logits,
  labels[:, None])` with a context holding ignore_index=255 and the CE module(s), then the CE terms with
  that weight (as `BaseDecodeHead.loss_by_feat`).
- linear_lr.start0.1_end5: the learning rate mmengine's `LinearLR(start_factor=0.1, by_epoch=False, begin=0,
  end=5)` sets on a constant lr of 1 for iterations 0..7 (the `--warmup` factor).
- sum_ce_dice: a decode head's `loss_decode=[CrossEntropyLoss(1.0), DiceLoss(loss_weight=3.0)]`: each
  named term (`loss_ce`, `loss_dice`) and the gradient of their sum.
"""
import argparse
import json
import os
import types
import warnings

warnings.filterwarnings('ignore')

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPE = (2, 4, 9, 11)
CLASS_WEIGHT = [0.5, 1.0, 2.0, 1.5]


def inputs():
    g = torch.Generator().manual_seed(21)
    logits = (torch.randn(SHAPE, generator=g, dtype=torch.float64) * 2.0)
    labels = torch.randint(0, SHAPE[1], (SHAPE[0],) + SHAPE[2:], generator=g)
    labels[1][labels[1] == 3] = 2  # class 3 absent from image 1
    ignored = torch.rand(labels.shape, generator=g) < 0.15
    labels[ignored] = 255
    labels[0, :2, :3] = 255
    return logits, labels


def kernel_focal(pred, target, gamma, alpha, weight, reduction):
    """mmcv's CUDA sigmoid_focal_loss forward, elementwise, in PyTorch (for the cross-check)."""
    p = pred.sigmoid()
    k = pred.shape[1]
    is_t = F.one_hot(target, k).to(pred.dtype)
    tiny = torch.finfo(pred.dtype).tiny
    term_p = (1 - p).pow(gamma) * torch.log(p.clamp(min=tiny))
    term_n = p.pow(gamma) * torch.log((1 - p).clamp(min=tiny))
    return -is_t * alpha * term_p - (1 - is_t) * (1 - alpha) * term_n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default='tests/data/mmseg_losses/reference.safetensors')
    args = ap.parse_args()

    import mmseg
    from mmseg.models.losses import CrossEntropyLoss, DiceLoss, FocalLoss, LovaszLoss
    from mmseg.models.losses import focal_loss as focal_mod
    from mmseg.structures.sampler import OHEMPixelSampler
    from safetensors.torch import save_file

    assert mmseg.__version__ == '1.2.2', mmseg.__version__
    logits0, labels = inputs()
    cw = torch.tensor(CLASS_WEIGHT, dtype=torch.float64)
    valid = labels != 255
    tensors = {'logits': logits0, 'labels': labels.to(torch.int64), 'class_weight': cw}
    cases = {}

    def record(name, spec, fn, ohem=None, dtype='float64'):
        x = logits0.clone().requires_grad_(True)
        out = fn(x)
        if isinstance(out, tuple):
            terms, weight = out
        else:
            terms, weight = out, None
        if not isinstance(terms, dict):
            terms = {'loss': terms}
        total = sum(terms.values())
        total.backward()
        for key, value in terms.items():
            tensors[f'{name}.{key}'] = value.detach().reshape(())
        tensors[f'{name}.grad'] = x.grad.detach().clone()
        if weight is not None:
            tensors[f'{name}.weight'] = weight.detach().clone()
        cases[name] = {'spec': spec, 'ohem': ohem, 'terms': sorted(terms), 'dtype': dtype}
        print(f'{name:32s} ' + ' '.join(f'{k}={v.item():.10f}' for k, v in terms.items()))

    # --- cross-entropy
    for avg in (False, True):
        name = 'ce_avg_non_ignore' if avg else 'ce'
        record(name, {'type': 'CrossEntropyLoss', 'avg_non_ignore': avg},
               lambda x, avg=avg: CrossEntropyLoss(avg_non_ignore=avg)(x, labels, ignore_index=255))
    for avg in (False, True):
        name = 'ce_class_weight_avg_non_ignore' if avg else 'ce_class_weight'
        module = CrossEntropyLoss(avg_non_ignore=avg, class_weight=CLASS_WEIGHT)
        try:
            module(logits0, labels, ignore_index=255)
            raise SystemExit('mmseg 1.2.2 no longer raises on class weights with ignored pixels: revisit the case')
        except IndexError:
            pass
        factor = cw[labels[valid]].sum()
        record(name, {'type': 'CrossEntropyLoss', 'avg_non_ignore': avg, 'class_weight': CLASS_WEIGHT},
               lambda x, m=module, f=factor: m(x, labels, ignore_index=255, avg_factor=f))
    # --- Dice
    dice_cases = {
        'dice_default': {},
        'dice_softmax_naive': {'use_sigmoid': False, 'naive_dice': True, 'eps': 1.0},
        'dice_ignore_channel0': {'ignore_index': 0, 'loss_weight': 2.0},
    }
    for name, kw in dice_cases.items():
        record(name, {'type': 'DiceLoss', **kw}, lambda x, kw=kw: DiceLoss(**kw)(x, labels, ignore_index=255))
    # --- Focal (CUDA-path semantics)
    focal_cases = {'focal': {}, 'focal_weighted': {'gamma': 1.5, 'alpha': 0.25, 'class_weight': CLASS_WEIGHT,
                                                    'loss_weight': 2.0}}
    for name, kw in focal_cases.items():
        module = FocalLoss(**kw)
        k = SHAPE[1]
        try:  # the CPU path as 1.2.2 ships it
            module(logits0, labels, ignore_index=255)
            raise SystemExit('mmseg 1.2.2 FocalLoss no longer fails on the CPU: revisit the focal cases')
        except RuntimeError:
            pass

        def cuda_path_inputs(x):
            pred = x.transpose(0, 1).reshape(k, -1).transpose(0, 1).contiguous()
            target = labels.view(-1)
            vmask = (target != 255).view(-1, 1)
            target = torch.where(target == 255, target.new_tensor(0), target)
            one_hot = F.one_hot(target, num_classes=k + 1)[:, :k]
            return pred, target, one_hot, vmask

        def via_py(x, module=module):
            pred, target, one_hot, vmask = cuda_path_inputs(x)
            return module.loss_weight * focal_mod.py_sigmoid_focal_loss(
                pred, one_hot, None, None, gamma=module.gamma, alpha=module.alpha,
                class_weight=module.class_weight, valid_mask=vmask, reduction='mean')

        pred, target, one_hot, vmask = cuda_path_inputs(logits0)
        saved = focal_mod._sigmoid_focal_loss
        focal_mod._sigmoid_focal_loss = kernel_focal
        try:
            kernel_value = module.loss_weight * focal_mod.sigmoid_focal_loss(
                pred, target, one_hot, None, gamma=module.gamma, alpha=module.alpha,
                class_weight=module.class_weight, valid_mask=vmask, reduction='mean')
        finally:
            focal_mod._sigmoid_focal_loss = saved
        py_value = via_py(logits0)
        rel = abs(float(kernel_value - py_value)) / abs(float(py_value))
        assert rel < 1e-12, f'{name}: kernel transcription {kernel_value} vs py_sigmoid_focal_loss {py_value}'
        print(f'{name:32s} cross-check: mmcv kernel formula vs py_sigmoid_focal_loss rel diff {rel:.1e}')
        record(name, {'type': 'FocalLoss', **kw}, via_py)
    # --- Lovasz
    lovasz_cases = {
        'lovasz_batch': {'per_image': False, 'reduction': 'none'},
        'lovasz_per_image': {'per_image': True, 'reduction': 'mean'},
        'lovasz_all_weighted': {'classes': 'all', 'per_image': True, 'reduction': 'sum', 'class_weight': CLASS_WEIGHT,
                                'loss_weight': 0.5},
    }
    for name, kw in lovasz_cases.items():
        # 1.2.2's lovasz_grad casts to float32 (a float64 input fails in torch.dot): these cases run in float32
        record(name, {'type': 'LovaszLoss', **kw},
               lambda x, kw=kw: LovaszLoss(**kw)(x.float(), labels, ignore_index=255), dtype='float32')
    # --- OHEM + CE, as BaseDecodeHead.loss_by_feat
    ohem_cases = {'ohem_thresh': (0.7, 10), 'ohem_thresh_min_kept': (0.3, 60), 'ohem_topk': (None, 40)}
    for name, (thresh, min_kept) in ohem_cases.items():
        ce = CrossEntropyLoss(avg_non_ignore=True, class_weight=None)
        context = types.SimpleNamespace(ignore_index=255, loss_decode=ce)
        sampler = OHEMPixelSampler(context, thresh=thresh, min_kept=min_kept)

        def fn(x, sampler=sampler, ce=ce):
            weight = sampler.sample(x, labels[:, None])
            return ce(x, labels, weight=weight, ignore_index=255), weight

        record(name, {'type': 'CrossEntropyLoss', 'avg_non_ignore': True}, fn, ohem=[thresh, min_kept])
        kept = int(tensors[f'{name}.weight'].sum())
        print(f'{name:32s} kept {kept} of {int(valid.sum())} valid pixels')
    # --- a sum of terms, as loss_decode=[...] lists them
    terms = [CrossEntropyLoss(loss_weight=1.0), DiceLoss(loss_weight=3.0)]
    record('sum_ce_dice', [{'type': 'CrossEntropyLoss'}, {'type': 'DiceLoss', 'loss_weight': 3.0}],
           lambda x: {t.loss_name: t(x, labels, ignore_index=255) for t in terms})

    # --- the warm-up factor: mmengine's LinearLR(start_factor=0.1, begin=0, end=5) on a constant lr of 1
    from mmengine.optim.scheduler import LinearLR
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LinearLR(opt, start_factor=0.1, by_epoch=False, begin=0, end=5)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    tensors['linear_lr.start0.1_end5'] = torch.tensor(lrs, dtype=torch.float64)
    print('LinearLR(0.1, end=5) lr per iteration:', ' '.join(f'{v:.6f}' for v in lrs))

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {'cases': json.dumps(cases), 'mmseg_version': mmseg.__version__, 'torch_version': torch.__version__,
            'generator': 'tools/mmseg_loss_reference.py'}
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out, metadata=meta)
    print(f'wrote {args.out} ({os.path.getsize(args.out)} bytes, {len(cases)} cases)')


if __name__ == '__main__':
    main()
