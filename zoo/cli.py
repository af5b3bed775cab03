"""The `isa` command line: one sub-command per job, each package contributing its own."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

from .registry import get_config, list_models


def _list(args: argparse.Namespace) -> int:
    for name in list_models(args.pattern):
        print(name)
    return 0


def _info(args: argparse.Namespace) -> int:
    cfg = get_config(args.name)
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    rows = [("name", cfg.name), ("backbone", f"{cfg.backbone} ({cfg.backbone_type})"),
            ("dataset", f"{cfg.dataset} ({cfg.num_classes} classes)"),
            ("crop", "x".join(map(str, cfg.crop_size_hw))), ("iters", cfg.iters),
            ("batch", f"{cfg.total_batch_size} ({cfg.gpus} GPUs x {cfg.samples_per_gpu})"),
            ("test", cfg.test_mode + (f" crop {cfg.test_crop_size_hw} stride {cfg.test_stride_hw}"
                                      if cfg.test_mode == "slide" else "")),
            ("align_corners", cfg.align_corners), ("mIoU", f"{cfg.mIoU:.2f} (ms+flip {cfg.mIoU_ms_flip:.2f})"),
            ("checkpoint", cfg.checkpoint_url)]
    for key, value in rows:
        print(f"{key:>14}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full `isa` parser, with every package's sub-commands."""
    parser = argparse.ArgumentParser(prog="isa", description="ISANet model zoo with fused Triton attention")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list the variants (fnmatch PATTERN)")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(func=_list)

    p = sub.add_parser("info", help="settings and published numbers of one variant")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print variants.json's fields as JSON")
    p.set_defaults(func=_info)

    from . import weights, hub  # noqa: E401 — each module owns its parser
    weights.add_convert_parser(sub)
    hub.add_download_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks: `isa bench model`, `isa bench kernels`")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    # each package owns its parser; imported here so that `isa --help` lists every command
    from isa_triton import bench as kernel_bench
    from eval import cli as eval_cli
    from train import cli as train_cli
    from . import bench as model_bench, demo

    model_bench.add_parser(bench_sub)
    kernel_bench.add_parser(bench_sub)
    eval_cli.add_eval_parser(sub)
    eval_cli.add_predict_parser(sub)
    train_cli.add_train_parser(sub)
    demo.add_demo_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `isa` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (KeyError, ValueError, FileNotFoundError, RuntimeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"isa {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
