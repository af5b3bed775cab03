"""Every launch configuration the Triton op can pick compiles for an H100 (sm_90) within its limits.

Runs on the CPU: Triton compiles for an explicit `GPUTarget("cuda", 90, 32)` (no GPU or driver
needed) and the ptxas bundled with Triton reports registers and spills of the PTX (`-v`). The
launches come from `kernels.launch_plans` on meta tensors, so they are exactly the ones the op
makes, with Triton's own specialisation of strides equal to 1 and of multiples of 16. The sweep's
candidates (`isa_triton.candidates`) likewise, mostly marked slow.

TRITON_MODE = "compile": a process whose Triton compiles (a child pytest when this one set
TRITON_INTERPRET=1; tests/kernel_env.py), which is also where the errors for CPU tensors are checked.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

from isa_triton import candidates, kernels  # noqa: E402

pytest_plugins = ("kernel_env",)
TRITON_MODE = "compile"

H100_SMEM = 227 * 1024  # bytes of shared memory one block may use on an H100
REG_FILE = 64 * 1024  # 32-bit registers per SM
_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _ptxas() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else "ptxas"


def _signature(launch: kernels.Launch):
    """Signature, constexprs and divisibility attributes as Triton specialises a real launch."""
    names = launch.kernel.arg_names
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for i, name in enumerate(names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            continue
        value = launch.args[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _DT[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # the caching allocator aligns to 256 bytes
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(value)}")
    return signature, constexprs, attrs


def compile_sm90(launch: kernels.Launch) -> dict:
    """Compile one launch for sm_90a; return shared memory bytes, registers and spill bytes."""
    signature, constexprs, attrs = _signature(launch)
    src = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    compiled = triton.compile(src, target=target, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    report = res.stderr + res.stdout
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spill_st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", report))
    spill_ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", report))
    stack = sum(int(x) for x in re.findall(r"(\d+) bytes stack frame", report))
    return dict(shared=compiled.metadata.shared, regs=regs, spill_stores=spill_st, spill_loads=spill_ld,
                stack=stack, num_warps=launch.num_warps, wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                mma_sync=len(re.findall(r"\bmma\.sync", ptx)), tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)))


def _meta(n, c, h, w, dtype, channels_last=False):
    x = torch.empty(n, c, h, w, dtype=dtype, device="meta")
    return x.to(memory_format=torch.channels_last) if channels_last else x


# (H, W, pattern): the ISA geometries of spec §1.3 (feature maps after padding to a multiple of 8)
ISA_CASES = [
    (128, 256, "long"), (64, 128, "long"), (104, 104, "long"), (64, 88, "long"), (64, 64, "long"),
    (128, 256, "short"),
    (256, 512, "long"),  # L = 2048: the largest flash case (e.g. 2048x4096 whole images)
    (8, 32, "long"),  # L = 4: smallest tile
    (24, 32, "long"),  # L = 12 -> BLOCK_L 16
    (32, 40, "long"),  # L = 20 -> BLOCK_L 32
]


def all_launches(dtypes=(torch.float16, torch.bfloat16), channels=((256, 512), (64, 64), (16, 24)),
                 bwd_configs=None):
    """Distinct launch configurations (kernel, constexprs, warps, stages) over ISA-like problems.

    `bwd_configs(dtype, cqk, cv, gather)`: the long-range backward's config (None: the op's own)."""
    seen = {}
    for dtype in dtypes:
        for cqk, cv in channels:
            for h, w, pattern in ISA_CASES:
                for cl in (False, True):
                    for n in (1, 8):
                        q = _meta(n, cqk, h, w, dtype, cl)
                        v = _meta(n, cv, h, w, dtype, cl)
                        long_groups = pattern == "long" and kernels._np2((h // 8) * (w // 8)) > kernels.TILE_MAX
                        bwd = bwd_configs(dtype, cqk, cv, not cl) if bwd_configs and long_groups else None
                        for launch in kernels.launch_plans(q, q, v, pattern, (8, 8), bwd_cfg=bwd):
                            key = launch.config_key() + (dtype, cl)
                            seen.setdefault(key, launch)
    return seen


ONE_PASS_KERNELS = ("bwd_fused", "bwd_kv", "bwd_dq_cast", "bwd_dq")


def sweep_launches(dtype, cqk=256, cv=512):
    """The kernels of every `isa bench kernels --sweep` entry (128x256, ISA channels, as the sweep runs them)."""
    seen = {}
    for cl, kind in ((True, "contiguous"), (False, "gather")):
        q = _meta(1, cqk, 128, 256, dtype, cl)
        v = _meta(1, cv, 128, 256, dtype, cl)
        plans = []
        for cfg in candidates.FWD_SWEEP[kind]:
            plans += kernels.launch_plans(q, q, v, "long", (8, 8), fwd_cfg=cfg, backward=False)
        if cl:
            for cfg in candidates.SHORT_FWD_SWEEP:
                plans += kernels.launch_plans(q, q, v, "short", (8, 8), fwd_cfg=cfg, backward=False)
        for cfg in candidates.BWD_SWEEP[kind]:
            plans += kernels.launch_plans(q, q, v, "long", (8, 8), bwd_cfg=cfg)[1:]
        for launch in plans:
            seen.setdefault(launch.config_key() + (dtype, cl), launch)
    return seen


def _check(launches):
    failures, rows = [], []
    for launch in launches.values():
        stats = compile_sm90(launch)
        blocks = {k: v for k, v in launch.constexprs.items()
                  if k.startswith(("BLOCK", "GROUPS", "DQ_", "RELOAD", "DV_SPLIT", "ROWS", "GWB"))}
        rows.append(f"{launch.name:<10} {blocks} warps={launch.num_warps} stages={launch.num_stages}: "
                    f"smem {stats['shared']} B, {stats['regs']} regs, "
                    f"spills {stats['spill_stores']}/{stats['spill_loads']}")
        if stats["shared"] > H100_SMEM:
            failures.append(f"{launch.name} {blocks}: shared memory {stats['shared']} B > {H100_SMEM} B")
        if stats["spill_stores"] or stats["spill_loads"]:
            failures.append(f"{launch.name} {blocks}: register spills {stats}")
        if stats["regs"] * 32 * stats["num_warps"] > REG_FILE:
            failures.append(f"{launch.name} {blocks}: {stats['regs']} registers x {stats['num_warps']} warps")
    print("\n".join(rows))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_isa_launch_configs_fit_an_h100(dtype):
    """Every config the op picks at Cqk 256 / Cv 512 (ISA) fits sm_90: smem <= 227 KB, no spills."""
    _check(all_launches(dtypes=(dtype,), channels=((256, 512),)))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, marks=pytest.mark.slow), torch.bfloat16],
                         ids=["fp16", "bf16"])
def test_one_pass_backward_configs_fit_an_h100(dtype):
    """The sweep's one-pass backwards (fused, split): their default configs at Cqk 256 / Cv 512."""
    launches = {}
    for make in (candidates.fused_bwd_config, candidates.split_bwd_config):
        found = all_launches(dtypes=(dtype,), channels=((256, 512),), bwd_configs=make)
        launches.update({k: v for k, v in found.items() if v.name in ONE_PASS_KERNELS})
    assert {v.name for v in launches.values()} == set(ONE_PASS_KERNELS)
    _check(launches)


def test_tma_kernels_use_bulk_tensor_copies_and_wgmma():
    """The TMA sweep candidates compile to Hopper's bulk-tensor copies and wgmma, within the limits."""
    q = _meta(1, 256, 128, 256, torch.bfloat16, True)
    v = _meta(1, 512, 128, 256, torch.bfloat16, True)
    fwd = next(c for c in candidates.FWD_SWEEP["contiguous"] if isinstance(c, candidates.TmaFwdConfig))
    bwd = next(c for c in candidates.BWD_SWEEP["contiguous"] if getattr(c, "tma", False))
    launches = [p for p in kernels.launch_plans(q, q, v, "long", (8, 8), fwd_cfg=fwd, bwd_cfg=bwd)
                if p.name.endswith("tma")]
    assert [p.name for p in launches] == ["fwd_tma", "bwd_dq_tma"]
    for launch in launches:
        stats = compile_sm90(launch)
        assert stats["tma"] > 0 and stats["wgmma"] > 0 and stats["mma_sync"] == 0, (launch.name, stats)
        assert stats["shared"] <= H100_SMEM and not stats["spill_stores"], (launch.name, stats)


@pytest.mark.slow
def test_sweep_configs_fit_an_h100():
    """Every alternative `isa bench kernels --sweep` times (bf16, as it runs them) fits sm_90 too."""
    launches = sweep_launches(torch.bfloat16)
    names = {v.name for v in launches.values()}
    assert {"fwd_flash", "fwd_tma", "fwd_tile", "fwd_tile_split", "bwd_dkdv", "bwd_fused", "bwd_kv", "bwd_dq",
            "bwd_dq_tma"} <= names
    _check(launches)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_other_channel_counts_fit_an_h100(dtype):
    """The same for Cqk/Cv = 64/64 and 16/24 (single-chunk and tiny-channel branches)."""
    _check(all_launches(dtypes=(dtype,), channels=((64, 64), (16, 24))))


def test_launch_plans_cover_both_paths_and_layouts():
    """The enumeration above really reaches the tile and flash kernels, gather and vector configs."""
    names = {(launch.name, key[-1]) for key, launch in all_launches(dtypes=(torch.bfloat16,),
                                                                     channels=((256, 512),)).items()}
    for name in ("fwd_tile", "bwd_tile", "fwd_flash", "bwd_delta", "bwd_dkdv", "bwd_dv", "bwd_dq"):
        assert (name, False) in names and (name, True) in names, name
    fused = {(launch.name, key[-1]) for key, launch in all_launches(
        dtypes=(torch.bfloat16,), channels=((256, 512),), bwd_configs=candidates.fused_bwd_config).items()}
    for name in ("bwd_fused", "bwd_dq_cast"):
        assert (name, False) in fused and (name, True) in fused, name
    assert not {n for n, _ in fused} & {"bwd_dkdv", "bwd_dv", "bwd_dq"}
    split = {(launch.name, key[-1]) for key, launch in all_launches(
        dtypes=(torch.bfloat16,), channels=((256, 512),), bwd_configs=candidates.split_bwd_config).items()}
    for name in ("bwd_kv", "bwd_dq"):
        assert (name, False) in split and (name, True) in split, name
    assert not {n for n, _ in split} & {"bwd_dkdv", "bwd_dv", "bwd_fused", "bwd_dq_cast"}


def test_triton_on_cpu_without_interpreter_says_how_to_enable_it():
    from isa_triton import sparse_attention

    assert not kernels.interpreter_enabled()
    q = torch.randn(1, 16, 8, 8)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before Python imports triton"):
        sparse_attention(q, q, q, "short", (4, 4), backend="triton")


def test_interpreter_switched_on_after_import_is_refused_with_the_fix(monkeypatch):
    """Triton reads TRITON_INTERPRET when it is imported: setting it later cannot work, and says so."""
    from isa_triton import sparse_attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 16, 8, 8)
    with pytest.raises(RuntimeError, match="must be set before Triton is imported"):
        sparse_attention(q, q, q, "short", (4, 4), backend="triton")
