"""The `isa` command line: one sub-command per job; the parsers live here, the work in the packages.

    isa list | info | download | convert | eval | predict | train | bench | demo | import | push
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import List, Optional

from isa import UsageError
from zoo.registry import get_config, list_models, variant_row


def _list(args: argparse.Namespace) -> int:
    for name in list_models(args.pattern):
        print(name)
    return 0


def _info(args: argparse.Namespace) -> int:
    cfg = get_config(args.name)
    if args.json:
        print(json.dumps(variant_row(cfg.name), indent=1))
        return 0
    rows = [("name", cfg.name), ("backbone", f"ResNetV1c-{cfg.depth}-D8"),
            ("dataset", f"{cfg.dataset_name} ({cfg.num_classes} classes)"),
            ("crop", "x".join(map(str, cfg.crop_size_hw))), ("iters", cfg.iters),
            ("batch", f"{cfg.total_batch_size} ({cfg.gpus} GPUs x {cfg.samples_per_gpu})"),
            ("test", cfg.test_mode + (f" crop {cfg.test_crop_size_hw} stride {cfg.test_stride_hw}"
                                      if cfg.test_mode == "slide" else "")),
            ("align_corners", cfg.align_corners), ("mIoU", f"{cfg.mIoU:.2f} (ms+flip {cfg.mIoU_ms_flip:.2f})"),
            ("checkpoint", cfg.checkpoint_url)]
    for key, value in rows:
        print(f"{key:>14}  {value}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from zoo.reader import read_metadata
    from zoo.weights import convert_checkpoint

    dst = convert_checkpoint(args.src, args.dst, args.model, num_classes=args.num_classes)
    meta = read_metadata(dst)
    print(f"wrote {dst}: {meta['variant']}, {meta['num_classes']} classes, "
          f"source sha256 {meta['source_sha256'][:8]}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from zoo.hub import backbone_weights, download

    names = list_models() if args.all else []
    for pattern in args.names:
        matched = list_models(pattern)
        if not matched:
            get_config(pattern)  # raises KeyError with close matches
        names += [n for n in matched if n not in names]
    if not names:
        raise UsageError("name a variant (patterns allowed) or pass --all")
    if args.url and len(names) != 1:
        raise UsageError("--url needs exactly one variant")
    for name in names:
        print(download(name, cache_dir=args.cache_dir, progress=not args.no_progress, url=args.url,
                       force=args.force, keep_pth=args.keep_pth,
                       instead=f"--url URL (a copy of that file on a mirror: isa download {name} --url URL)"))
        if args.backbone:
            print(backbone_weights(name, cache_dir=args.cache_dir, progress=not args.no_progress, force=args.force))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full `isa` parser, with every sub-command."""
    from zoo.hub import DEFAULT_CACHE_DIR, ENV_HOME

    from . import bench, demo, evaluation, export, importing, training

    parser = argparse.ArgumentParser(prog="isa", description="ISANet model zoo with fused Triton attention")
    parser.add_argument("--verbose", action="store_true",
                        help="show every library's INFO logging (anywhere on the line; quiet by default)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list the variants (fnmatch PATTERN)")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(func=_list)

    p = sub.add_parser("info", help="settings and published numbers of one variant")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print variants.json's fields as JSON")
    p.set_defaults(func=_info)

    p = sub.add_parser(
        "download", help="download published weights into the cache",
        description=f"Download MMSegmentation's ISANet checkpoints, check their sha256 prefix and store them as "
                    f"<cache>/<variant>.safetensors. Cache: --cache-dir, ${ENV_HOME} or {DEFAULT_CACHE_DIR}. "
                    "Offline: copy the .pth into the cache under its original name; it is checked and converted "
                    "on first use.")
    p.add_argument("names", nargs="*", help="variant names or fnmatch patterns ('isanet_r50*')")
    p.add_argument("--all", action="store_true", help="all 16 variants")
    p.add_argument("--cache-dir", default=None, help=f"cache folder (default ${ENV_HOME} or {DEFAULT_CACHE_DIR})")
    p.add_argument("--url", default=None, help="download from this URL instead (one variant)")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.add_argument("--keep-pth", action="store_true", help="keep the original .pth in the cache")
    p.add_argument("--backbone", action="store_true",
                   help="also fetch the ImageNet ResNetV1c weights the variant's training recipe starts from")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_download)

    p = sub.add_parser(
        "convert", help="convert an MMSegmentation .pth checkpoint to .safetensors",
        description="Read an MMSegmentation checkpoint safely (no pickled code runs), check every key and shape "
                    "against the variant, and write a .safetensors file atomically.")
    p.add_argument("src", help="MMSegmentation checkpoint (.pth) or .safetensors")
    p.add_argument("dst", help="output file, ending in .safetensors")
    p.add_argument("--model", required=True, help="variant name, e.g. isanet_r50-d8_512x1024_40k_cityscapes")
    p.add_argument("--num-classes", type=int, default=None,
                   help="class count of a fine-tuned checkpoint (default: the variant's)")
    p.set_defaults(func=_convert)

    evaluation.add_parsers(sub)
    training.add_parser(sub)
    bench.add_parser(sub)
    export.add_parser(sub)
    demo.add_parser(sub)
    importing.add_parsers(sub)
    return parser


# the packages whose INFO lines are the program's own progress; other libraries' INFO (onnxscript's
# optimiser passes, ...) is detail that only --verbose shows
OWN_LOGGERS = ("isa", "zoo", "eval", "train", "isa_triton")


class _QuietFilter(logging.Filter):
    """Warnings from everyone; INFO only from this project's packages (everything with --verbose)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return (self.verbose or record.levelno >= logging.WARNING
                or record.name.split(".", 1)[0] in OWN_LOGGERS)


def setup_logging(verbose: bool = False) -> None:
    """Log lines on stderr: this project's INFO and everyone's warnings; all INFO with `verbose`."""
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 reports progress
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, _QuietFilter)]:
            handler.removeFilter(old)
        handler.addFilter(_QuietFilter(verbose))


def _closed_pipe() -> int:
    """The reader of stdout went away (`isa list | head -n 1`): stop without a word, as Unix tools do.

    stdout is pointed at /dev/null so that the interpreter's last flush does not fail again; the exit
    status is 141 (128 + SIGPIPE), what a shell reports for a tool that SIGPIPE ended (`yes | head`)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (a test's capture)
        pass
    return 128 + signal.SIGPIPE


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `isa` console script (and `python -m isa`).

    `--verbose` anywhere on the line shows every library's INFO logging (quiet by default)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    setup_logging(verbose)
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt:  # files are written atomically: nothing half-written is left behind
        print(f"isa {args.command}: interrupted (Ctrl-C); files already written are complete", file=sys.stderr)
        return 130
    except (KeyError, ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        if message.startswith("Caught ") and "Original Traceback" in message:  # raised in a DataLoader worker
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]  # its own message, not the traceback
        print(f"isa {args.command}: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, (KeyError, UsageError)) else 1


if __name__ == "__main__":
    sys.exit(main())
