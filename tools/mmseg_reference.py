#!/usr/bin/env python
"""Independent MMSegmentation reference for isa-triton (runs in /work/mmseg_env, NOT the project venv).

Builds an ISANet variant exactly as MMSegmentation 1.2.2 does (from its own 1.x config, SyncBN reverted
to BN with mmengine's ``revert_sync_batchnorm``), seeded random init, non-trivial BN statistics/affine,
eval mode, then writes

  OUT/<name>.pth                 MMSegmentation-0.x-style checkpoint {'meta': {...}, 'state_dict': ...}
  OUT/<name>_logits.safetensors  x_<H>x<W>, logits_fp32_<H>x<W>, logits_fp64_<H>x<W>  (.pt if no safetensors)
  OUT/<name>_report.json         MMSegmentation's own fp32-vs-fp64 error, weights_only check, settings

Logits are ``model.encode_decode(x, batch_img_metas)`` (1.2.2: backbone -> ISAHead -> bilinear resize to
img_shape with the head's align_corners), i.e. "whole" inference on a normalized input.

Usage (see tools/MMSEG_REFERENCE.md):
  /work/mmseg_env/bin/python tools/mmseg_reference.py isanet_r50-d8_512x1024_40k_cityscapes --out /work/mmseg_out
  /work/mmseg_env/bin/python tools/mmseg_reference.py --time            # R-50 1x3x512x1024 CPU timing
"""
import argparse
import io
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings('ignore', message='.*MultiScaleDeformableAttention.*')
warnings.filterwarnings('ignore', message='.*build_loss.*')
warnings.filterwarnings('ignore', message='.*Default upsampling behavior.*')

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS_CANDIDATES = [
    os.path.join(HERE, '..', '..', 'shared', 'spec', 'variants.json'),
    '/work/shared/spec/variants.json',
    os.path.join(HERE, '..', 'zoo', 'variants.json'),
]
DEFAULT_SIZES = '200x264,256x344'   # 1/8 features 25x33 (pad 7,7) and 32x43 (pad 0,5): both need ISA padding


def load_variants():
    for p in VARIANTS_CANDIDATES:
        if os.path.exists(p):
            with open(p) as f:
                return {v['name']: v for v in json.load(f)['variants']}
    raise FileNotFoundError('variants.json not found in ' + ', '.join(VARIANTS_CANDIDATES))


def config_path(cfg_name):
    import mmseg
    p = os.path.join(os.path.dirname(mmseg.__file__), '.mim', 'configs', 'isanet', cfg_name + '.py')
    if not os.path.exists(p):
        raise FileNotFoundError(p)
    return p


def build_mmseg_model(name, seed=0):
    """Build the variant from MMSegmentation's own 1.x config; returns (model, cfg, variant)."""
    from mmengine.config import Config
    from mmengine.model.utils import revert_sync_batchnorm
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    import logging
    from mmengine.logging import MMLogger
    MMLogger.get_current_instance().setLevel(logging.WARNING)   # init_weights logs every parameter at INFO
    variant = load_variants()[name]
    cfg = Config.fromfile(config_path(variant['mmseg_1x_config_name']))
    mcfg = cfg.model.copy()
    mcfg.pretrained = None                # no download: random init instead of open-mmlab://resnet*_v1c
    mcfg.pop('data_preprocessor', None)   # we feed already-normalized tensors to encode_decode
    torch.manual_seed(seed)
    model = MODELS.build(mcfg)
    model.init_weights()                  # mmseg's own init (Kaiming convs, BN 1/0, conv_seg N(0,0.01))
    model = revert_sync_batchnorm(model)  # SyncBN -> BN (what mmseg tools do on CPU)
    assert model.decode_head.align_corners == variant['align_corners'], (model.decode_head.align_corners, variant)
    return model, cfg, variant


def _bns(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def randomize_bn(model, seed=0, calib_hw=(96, 128), iters=40000, style='tame'):
    """Non-trivial BN everywhere: random affine (weight U(0.5,1.5), bias N(0,0.2)); running stats
    calibrated on a seeded random input (cumulative average, so activations stay O(1) through 100+
    layers), then perturbed so folded BN is far from identity.

    style 'tame' (default): bn3 of every Bottleneck gets weight x0.25 (small last-gamma residual branches,
    as in trained ResNets / mmseg's zero_init_residual), the last BN of key_project/query_project gets
    weight and bias x0.6 (attention logits std ~1, softmax clearly non-uniform but not saturated), stats
    perturbed mildly (mean += 0.1 sigma N(0,1), var *= U(0.75,1.33)). This keeps fp32 rounding from being
    amplified chaotically: MMSeg's own fp32-vs-fp64 rel-L2 is ~1e-6, so a 2x criterion is meaningful.
    style 'wild': no taming, perturbation mean += 0.2 sigma N, var *= U(0.6,1.6); a random deep ReLU/BN
    net plus saturated attention (logit std ~17) then amplifies fp32 rounding ~1000x (rel-L2 ~3e-4..1e-3).
    """
    g = torch.Generator().manual_seed(seed + 1)
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for n, bn in named:
        c = bn.num_features
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.2)
        if style == 'tame':
            if n.endswith('.bn3'):
                bn.weight.mul_(0.25)
            if n.endswith(('key_project.1.bn', 'query_project.1.bn')):
                bn.weight.mul_(0.6)
                bn.bias.mul_(0.6)
        bn.reset_running_stats()
        bn.momentum = None                # cumulative average over the calibration pass
    model.train()
    x = torch.randn(1, 3, *calib_hw, generator=g)
    feats = model.extract_feat(x)
    model.decode_head.forward(feats)
    model.auxiliary_head.forward(feats)
    mean_f, var_lo, var_hi = (0.1, 0.75, 1.33) if style == 'tame' else (0.2, 0.6, 1.6)
    for _, bn in named:
        c = bn.num_features
        std = bn.running_var.sqrt()
        bn.running_mean.add_(mean_f * std * torch.randn(c, generator=g))
        bn.running_var.mul_(var_lo + (var_hi - var_lo) * torch.rand(c, generator=g))
        bn.momentum = 0.1
        bn.num_batches_tracked.fill_(iters)
    model.eval()
    return len(named)


def _attention_stats(block, x):
    """Sharpness of an ISA SelfAttentionBlock's softmax (for the report)."""
    q = block.query_project(x).flatten(2).transpose(1, 2)
    k = block.key_project(x).flatten(2)
    s = (q @ k) * block.channels ** -0.5
    return {'logit_std': float(s.std()), 'mean_max_prob': float(s.softmax(-1).amax(-1).mean()),
            'tokens': int(s.shape[-1])}


def dataset_meta(variant):
    from mmseg.datasets import ADE20KDataset, CityscapesDataset, PascalVOCDataset
    ds = {'Cityscapes': CityscapesDataset, 'ADE20K': ADE20KDataset}.get(variant['dataset'], PascalVOCDataset)
    mi = ds.METAINFO
    return tuple(mi['classes']), [list(map(int, p)) for p in mi['palette']]


def make_checkpoint(model, cfg, variant, seed):
    import mmcv
    import mmseg
    classes, palette = dataset_meta(variant)
    assert len(classes) == variant['num_classes'], (len(classes), variant['num_classes'])
    meta = {
        'env_info': f'sys.platform: {sys.platform}\nPython: {sys.version}\nPyTorch: {torch.__version__}\n'
                    f'MMSegmentation: {mmseg.__version__}\n(mmseg_reference.py: random weights)',
        'seed': int(seed),
        'exp_name': variant['name'] + '.py',
        'mmseg_version': mmseg.__version__,
        'config': cfg.pretty_text,
        'CLASSES': classes,
        'PALETTE': palette,
        'mmcv_version': mmcv.__version__,
        'time': time.asctime(),
        'epoch': 1,
        'iter': int(variant['iters']),
        'hook_msgs': {'last_ckpt': f'work_dirs/{variant["name"]}/iter_{variant["iters"]}.pth'},
    }
    sd = model.state_dict()
    sd = type(sd)((k, v.detach().cpu().clone()) for k, v in sd.items())
    return {'meta': meta, 'state_dict': sd}


def check_weights_only(path):
    res = {}
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True)
        res['weights_only_true'] = 'ok'
        res['weights_only_keys'] = sorted(ck.keys())
    except Exception as e:  # noqa: BLE001
        res['weights_only_true'] = f'FAILED: {type(e).__name__}: {e}'
    try:
        torch.load(path, map_location='cpu')
        res['default_torch_load'] = 'ok'
    except Exception as e:  # noqa: BLE001
        res['default_torch_load'] = f'FAILED: {type(e).__name__}: {e}'
    # What a real training checkpoint could also carry: numpy scalars in meta (e.g. an EvalHook best_score).
    import numpy as np
    buf = io.BytesIO()
    torch.save({'meta': {'hook_msgs': {'best_score': np.float64(0.8)}}, 'state_dict': {}}, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
        res['numpy_scalar_in_meta_weights_only'] = 'ok'
    except Exception as e:  # noqa: BLE001
        lines = [ln.strip() for ln in str(e).splitlines() if 'GLOBAL' in ln or 'Unsupported' in ln]
        res['numpy_scalar_in_meta_weights_only'] = f'FAILED: {type(e).__name__}: ' + ' | '.join(lines or [str(e)[:300]])
    return res


def parse_sizes(s):
    out = []
    for t in s.split(','):
        h, w = t.lower().split('x')
        out.append((int(h), int(w)))
    return out


def metas_for(h, w):
    return [dict(img_shape=(h, w), ori_shape=(h, w))]


def errs(a, ref):
    d = (a.double() - ref.double())
    return {'max_abs': float(d.abs().max()),
            'rel_l2': float(d.norm() / ref.double().norm()),
            'ref_max_abs': float(ref.abs().max()),
            'argmax_agree': float((a.argmax(1) == ref.argmax(1)).double().mean())}


def run_variant(name, out_dir, sizes, seed, threads, bn_style='tame'):
    torch.set_num_threads(threads)
    t0 = time.time()
    model, cfg, variant = build_mmseg_model(name, seed)
    nbn = randomize_bn(model, seed, iters=int(variant['iters']), style=bn_style)
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, name + '.pth')
    ck = make_checkpoint(model, cfg, variant, seed)
    torch.save(ck, ckpt_path)
    sd = ck['state_dict']
    wo = check_weights_only(ckpt_path)
    print(f'[{name}] {len(sd)} keys, {nbn} BN, checkpoint -> {ckpt_path} '
          f'({os.path.getsize(ckpt_path) / 2**20:.1f} MiB); torch.load(weights_only=True): {wo["weights_only_true"]}',
          flush=True)

    g = torch.Generator().manual_seed(seed + 2)
    tensors, report = {}, {'name': name, 'mmseg_1x_config': variant['mmseg_1x_config_name'],
                           'align_corners': variant['align_corners'], 'num_classes': variant['num_classes'],
                           'seed': seed, 'bn_style': bn_style, 'checkpoint': ckpt_path, 'n_keys': len(sd), 'n_bn': nbn,
                           'torch_load': wo, 'sizes': {}}
    for h, w in sizes:
        x = torch.randn(1, 3, h, w, generator=g)
        fh, fw = math.ceil(h / 8), math.ceil(w / 8)
        pad = (8 * math.ceil(fh / 8) - fh, 8 * math.ceil(fw / 8) - fw)
        model.float()
        att = {}
        hook = model.decode_head.global_relation.register_forward_hook(
            lambda mod, inp, out: att.update(_attention_stats(mod, inp[0])))
        with torch.inference_mode():
            ts = time.time()
            y32 = model.encode_decode(x, metas_for(h, w))
            t32 = time.time() - ts
        hook.remove()
        model.double()
        with torch.inference_mode():
            ts = time.time()
            y64 = model.encode_decode(x.double(), metas_for(h, w))
            t64 = time.time() - ts
        model.float()
        assert y32.shape == (1, variant['num_classes'], h, w), y32.shape
        e = errs(y32, y64)
        key = f'{h}x{w}'
        tensors[f'x_{key}'] = x.contiguous()
        tensors[f'logits_fp32_{key}'] = y32.contiguous()
        tensors[f'logits_fp64_{key}'] = y64.contiguous()
        report['sizes'][key] = {'feat_hw': [fh, fw], 'isa_pad_hw': list(pad), 'mmseg_fp32_vs_fp64': e,
                                'global_attention': att,
                                'sec_fp32': round(t32, 2), 'sec_fp64': round(t64, 2)}
        print(f'[{name}] x 1x3x{h}x{w} (1/8 feat {fh}x{fw}, ISA pad h{pad[0]} w{pad[1]}): MMSeg fp32 vs fp64 '
              f'max_abs {e["max_abs"]:.3e}  rel_L2 {e["rel_l2"]:.3e}  (|logits|max {e["ref_max_abs"]:.2f}, '
              f'argmax agree {e["argmax_agree"]:.5f}; global-attn logit std {att["logit_std"]:.2f}, mean max prob '
              f'{att["mean_max_prob"]:.3f} of {att["tokens"]})  [{t32:.1f}s fp32, {t64:.1f}s fp64]', flush=True)

    try:
        from safetensors.torch import save_file
        lpath = os.path.join(out_dir, name + '_logits.safetensors')
        save_file(tensors, lpath, metadata={'name': name, 'align_corners': str(variant['align_corners']), 'bn_style': bn_style,
                                            'sizes': ','.join(report['sizes']), 'seed': str(seed)})
    except ImportError:
        lpath = os.path.join(out_dir, name + '_logits.pt')
        torch.save(tensors, lpath)
    report['logits'] = lpath
    report['total_sec'] = round(time.time() - t0, 1)
    with open(os.path.join(out_dir, name + '_report.json'), 'w') as f:
        json.dump(report, f, indent=1)
    print(f'[{name}] logits -> {lpath}; report -> {os.path.join(out_dir, name + "_report.json")} '
          f'({report["total_sec"]}s)', flush=True)
    return report


def time_forward(name, size, threads, warmup, runs, bf16):
    torch.set_num_threads(threads)
    model, _, variant = build_mmseg_model(name, 0)
    randomize_bn(model, 0)
    h, w = size
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(3))
    metas = metas_for(h, w)

    def one(autocast):
        with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            ts, cs = time.perf_counter(), time.process_time()
            y = model.encode_decode(x, metas)
            cpu.append((time.process_time() - cs) * 1e3)
            return (time.perf_counter() - ts) * 1e3, y

    res = {}
    modes = [('fp32', False)] + ([('bf16_autocast', True)] if bf16 else [])
    y_ref = None
    for label, ac in modes:
        cpu = []
        try:
            for _ in range(warmup):
                one(ac)
            ts = []
            for _ in range(runs):
                t, y = one(ac)
                ts.append(t)
            cpu = cpu[warmup:]
            res[label] = {'median_ms': statistics.median(ts), 'min_ms': min(ts), 'runs_ms': [round(t, 1) for t in ts],
                          'median_cpu_ms_per_thread': statistics.median(cpu) / torch.get_num_threads()}
            if y_ref is None:
                y_ref = y.float()
            else:
                res[label]['vs_fp32'] = errs(y.float(), y_ref)
            print(f'MMSeg {name} 1x3x{h}x{w} {label} CPU threads={torch.get_num_threads()}: median '
                  f'{res[label]["median_ms"]:.0f} ms (min {res[label]["min_ms"]:.0f}; process CPU time/threads '
                  f'{res[label]["median_cpu_ms_per_thread"]:.0f} ms)  runs {res[label]["runs_ms"]}'
                  + (f'  vs fp32: rel_L2 {res[label]["vs_fp32"]["rel_l2"]:.3e}, argmax agree '
                     f'{res[label]["vs_fp32"]["argmax_agree"]:.4f}' if 'vs_fp32' in res[label] else ''),
                  flush=True)
        except Exception as e:  # noqa: BLE001
            res[label] = f'FAILED: {type(e).__name__}: {e}'
            print(f'{label}: {res[label]}', flush=True)
    res['loadavg'] = os.getloadavg()
    res['threads'] = torch.get_num_threads()
    res['torch'] = torch.__version__
    print('load average (1/5/15 min):', res['loadavg'])
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('names', nargs='*', help='variant names (0.x spelling, see variants.json)')
    ap.add_argument('--out', default='/work/mmseg_out')
    ap.add_argument('--sizes', default=DEFAULT_SIZES, help='comma list HxW (default %(default)s)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--bn-style', choices=('tame', 'wild'), default='tame', help='see randomize_bn')
    ap.add_argument('--time', action='store_true', help='time the eval forward instead of dumping')
    ap.add_argument('--time-name', default='isanet_r50-d8_512x1024_40k_cityscapes')
    ap.add_argument('--time-size', default='512x1024')
    ap.add_argument('--warmup', type=int, default=1)
    ap.add_argument('--runs', type=int, default=3)
    ap.add_argument('--no-bf16', action='store_true')
    ap.add_argument('--time-json', default=None, help='also write timing results to this json file')
    a = ap.parse_args(argv)
    if a.time:
        r = time_forward(a.time_name, parse_sizes(a.time_size)[0], a.threads, a.warmup, a.runs, not a.no_bf16)
        if a.time_json:
            with open(a.time_json, 'w') as f:
                json.dump(r, f, indent=1)
        return 0
    if not a.names:
        ap.error('give variant names or --time')
    for n in a.names:
        run_variant(n, a.out, parse_sizes(a.sizes), a.seed, a.threads, a.bn_style)
    return 0


if __name__ == '__main__':
    sys.exit(main())
