"""`isa import` (datasets from labelling tools and hubs) and `isa push` (a model to the Hugging Face Hub).

    isa import coco annotations/instances_train.json images/ --out my_data --val-fraction 0.1
    isa import labelme labelme_folder/ --out my_data --labels labels.txt
    isa import cityscapes data/cityscapes            # *_gtFine_labelTrainIds.png beside the labelIds
    isa import hf scene_parse_150 --out ade --mask-column annotation --reduce-zero-label
    isa push runs/mine/best.safetensors me/isanet-cats --dry-run upload/   # the folder that would be uploaded
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from isa import UsageError

WEIGHTS_FILE = "model.safetensors"  # zoo.hub.HF_WEIGHTS_FILE: the file `hf-hub:` names load


def _import(args: argparse.Namespace) -> int:
    from eval import importers

    if args.format == "cityscapes":
        importers.import_cityscapes(args.root, skip_invalid=args.skip_invalid)
        return 0
    if args.format == "coco":
        if len(args.pairs) % 2:
            raise UsageError("isa import coco takes ANNOTATIONS.json IMAGES_DIR pairs")
        report = importers.import_coco(args.pairs[0::2], args.pairs[1::2], args.out, split=args.split,
                                       val_fraction=args.val_fraction, seed=args.seed,
                                       background=not args.no_background, empty=args.empty,
                                       skip_invalid=args.skip_invalid)
    elif args.format == "labelme":
        report = importers.import_labelme(args.folder, args.out, labels=args.labels, val_fraction=args.val_fraction,
                                          seed=args.seed, line_width=args.line_width, point_size=args.point_size,
                                          skip_invalid=args.skip_invalid)
    else:
        report = importers.import_hf(args.dataset, args.out, image_column=args.image_column,
                                     mask_column=args.mask_column, classes=args.classes,
                                     reduce_zero_label=args.reduce_zero_label, split=args.split,
                                     val_fraction=args.val_fraction, seed=args.seed, revision=args.revision,
                                     skip_invalid=args.skip_invalid)
    print(report.format())
    print(f"wrote {args.out}: train with `isa train --model NAME --data {args.out}`")
    return 0 if report.ok else 1


# ------------------------------------------------------------------------------------------------ push

def model_card(weights: str | Path, repo_id: str, license: str = "apache-2.0",
               config: Optional[Dict[str, Any]] = None) -> str:
    """The README.md of a model repo: a YAML metadata block (library, license, tags) and the variant, classes,
    training data and metrics recorded in the weights' metadata, with the one-line loading snippet."""
    from zoo.metadata import ModelMeta
    from zoo.reader import read_metadata

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*", license):
        raise UsageError(f"--license {license!r}: give a license id such as apache-2.0, mit, cc-by-4.0 or other")
    raw = read_metadata(weights)
    meta = ModelMeta.from_metadata(raw, where=str(weights))
    cfg = meta.config
    extra = meta.extra

    def value(key: str) -> Any:
        try:
            return json.loads(extra[key]) if isinstance(extra.get(key), str) else extra.get(key)
        except ValueError:
            return extra[key]

    data = value("data")
    dataset = value("dataset") or cfg.dataset_name
    if data:
        training = f"a folder dataset `{Path(str(data)).name}`" + (f" ({config['train_images']} training images)"
                                                                    if config and "train_images" in config else "")
    elif meta.source_file and meta.source_file != "isa train":
        training = f"{cfg.dataset_name} (MMSegmentation's published checkpoint `{meta.source_file}`)"
    else:
        training = str(dataset)
    iters = value("train_iters")
    lines = ["---", "library_name: isa-triton", f"license: {license}", "pipeline_tag: image-segmentation",
             "tags:", "- image-segmentation", "- semantic-segmentation", "- isanet", "- isa-triton", "---", "",
             f"# {repo_id}", "",
             f"ISANet (interlaced sparse self-attention) semantic segmentation, variant `{meta.variant}` "
             f"(ResNetV1c-{cfg.depth}-D8), {meta.num_classes} classes, packaged with "
             "isa-triton. The weights file describes itself: classes, palette, "
             "normalisation and test pipeline are in its safetensors metadata.", "",
             "## Use", "", "```python",
             f'from zoo import Segmenter; seg = Segmenter(weights="hf-hub:{repo_id}")', "```", "",
             f"or `isa predict --weights hf-hub:{repo_id} photos/ --out-dir seg/`; pin a revision with "
             f"`hf-hub:{repo_id}@REVISION`.", "",
             "## Training data", "", f"- data: {training}"]
    if iters is not None:
        lines.append(f"- iterations: {iters}")
    if config:
        for key in ("crop_size", "batch_size", "lr", "seed"):
            if key in config:
                lines.append(f"- {key}: {config[key]}")
    lines += ["", "## Metrics", ""]
    best, best_iter = value("best_mIoU"), value("best_iter")
    if best is not None:
        lines.append(f"- validation mIoU: {float(best):.2f}" + (f" (iteration {best_iter})" if best_iter else "")
                     + f", test scale {list(meta.test.scale_wh)}")
    elif meta.source_file and meta.source_file != "isa train":
        lines.append(f"- published mIoU: {cfg.mIoU:.2f} (ms+flip {cfg.mIoU_ms_flip:.2f}) on {cfg.dataset_name}")
    else:
        lines.append("- none recorded in the weights")
    lines += ["", "## Classes", "", "| index | class | colour |", "|---|---|---|"]
    lines += [f"| {i} | {name.replace('|', chr(92) + '|')} | {list(colour)} |"
              for i, (name, colour) in enumerate(zip(meta.classes, meta.palette))]
    lines += ["", f"ignore index: {meta.ignore_index}" + (", reduce_zero_label" if meta.reduce_zero_label else ""), ""]
    return "\n".join(lines)


def stage_push(weights: str | Path, repo_id: str, folder: str | Path, license: str = "apache-2.0") -> Path:
    """Write the folder `isa push` uploads: model.safetensors, the run's config.json if beside the weights,
    and README.md (:func:`model_card`). ``folder`` must be new or empty."""
    from zoo.hub import parse_hf_hub
    from zoo.reader import read_metadata

    if parse_hf_hub(repo_id)[1] is not None:  # ValueError for what is no repo id
        raise ValueError(f"{repo_id!r}: the repo to push to is OWNER/REPO; give a branch with --revision")
    weights, folder = Path(weights), Path(folder)
    if not weights.is_file():
        raise FileNotFoundError(f"weights file {weights} not found")
    if weights.suffix != ".safetensors" or not read_metadata(weights).get("variant"):
        raise UsageError(f"{weights}: push a .safetensors file that names its variant (what `isa train` and "
                         "`isa convert` write); convert a .pth first with `isa convert SRC DST --model NAME`")
    if folder.exists() and any(folder.iterdir()):
        raise UsageError(f"--dry-run {folder} is not empty; choose a new folder")
    config = None
    config_path = weights.parent / "config.json"
    if config_path.is_file():  # read before anything is written: a bad one leaves no folder behind
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise ValueError(f"{config_path} (uploaded with the weights) is not readable JSON: {exc}; fix or move "
                             "it") from exc
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} (uploaded with the weights) is not a JSON object; fix or move it")
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        shutil.copyfile(config_path, folder / "config.json")
    shutil.copyfile(weights, folder / WEIGHTS_FILE)
    (folder / "README.md").write_text(model_card(weights, repo_id, license, config))
    return folder


def push(weights: str | Path, repo_id: str, *, license: str = "apache-2.0", private: bool = False,
         revision: Optional[str] = None, message: Optional[str] = None) -> str:
    """Upload the :func:`stage_push` folder to the Hugging Face model repo ``repo_id`` (created if missing);
    the token is huggingface_hub's (``HF_TOKEN`` or ``hf auth login``). Returns the commit URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:
        raise UsageError("isa push needs huggingface_hub: pip install 'isa-triton[hub]'") from exc
    with tempfile.TemporaryDirectory() as tmp:
        folder = stage_push(weights, repo_id, Path(tmp) / "upload", license)
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 commit_message=message or f"isa push {Path(weights).name}")
    return str(getattr(info, "commit_url", info))


def _push(args: argparse.Namespace) -> int:
    if args.dry_run:
        folder = stage_push(args.weights, args.repo, args.dry_run, args.license)
        print(f"wrote {folder} (what `isa push` would upload to {args.repo}): "
              + ", ".join(sorted(p.name for p in folder.iterdir())))
        return 0
    print(push(args.weights, args.repo, license=args.license, private=args.private, revision=args.revision,
               message=args.message))
    return 0


def add_parsers(subparsers: Any) -> None:
    """Register `isa import` and `isa push`."""
    p = subparsers.add_parser(
        "import", help="convert a dataset (COCO, labelme, Cityscapes, Hugging Face) to the folder layout",
        description="Write OUT/images/<split>/, OUT/masks/<split>/ (index PNGs) and OUT/dataset.json, the layout "
                    "`isa train --data` reads, deterministically; the data checks run at the end. A re-import "
                    "replaces a folder an earlier import wrote. The rules of each format are in the docstrings of "
                    "eval/importers/.")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")

    def common(q: argparse.ArgumentParser, out: bool = True, split: bool = True) -> None:
        if out:
            q.add_argument("--out", required=True, metavar="DIR", help="the dataset folder to write")
        if split:
            q.add_argument("--val-fraction", type=float, metavar="F", help="put this share of the images in val")
            q.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction split [0]")
        q.add_argument("--skip-invalid", action="store_true",
                       help="leave malformed images/annotations out (each is printed) instead of stopping")
        q.set_defaults(func=_import)

    q = formats.add_parser("coco", help="COCO segmentation JSON (polygons, RLE) + images folder",
                           description="Categories sorted by id become classes 1..K after background 0; crowd "
                                       "regions are ignored (255); overlapping instances: the smaller wins. A file "
                                       "named *val* / *test* gives that split, others train.")
    q.add_argument("pairs", nargs="+", metavar="ANNOTATIONS.json IMAGES_DIR",
                   help="one or more pairs: a COCO file and the folder its file_name entries are relative to")
    q.add_argument("--split", help="the split of all images [from each file's name]")
    q.add_argument("--no-background", action="store_true",
                   help="no background class: categories are classes 0..K-1, uncovered pixels are ignored")
    q.add_argument("--empty", choices=("keep", "skip"), default="keep",
                   help="images without annotations: keep as background, or skip [keep]")
    common(q)
    q = formats.add_parser("labelme", help="a folder of labelme JSON files",
                           description="Polygons, rectangles, circles, lines, linestrips and points, drawn in file "
                                       "order; classes: background + the sorted union of labels, or --labels.")
    q.add_argument("folder", help="folder with the .json files (searched recursively)")
    q.add_argument("--labels", help="class names in order: a labels.txt (one a line) or a comma-separated list")
    q.add_argument("--line-width", type=int, default=10, help="width of line/linestrip shapes in pixels [10]")
    q.add_argument("--point-size", type=int, default=5, help="radius of point shapes in pixels [5]")
    common(q)
    q = formats.add_parser("cityscapes", help="write *_gtFine_labelTrainIds.png beside a raw download's labelIds",
                           description="Map every gtFine/<split>/**/*_gtFine_labelIds.png through cityscapesscripts' "
                                       "id2label table (19 classes, 255 elsewhere), as MMSegmentation's converter "
                                       "does; the originals are not changed. Then `--data-root ROOT` works.")
    q.add_argument("root", help="the Cityscapes folder (gtFine/, leftImg8bit/)")
    common(q, out=False, split=False)
    q = formats.add_parser("hf", help="a Hugging Face `datasets` dataset (save_to_disk folder or Hub name)",
                           description="Needs `pip install 'isa-triton[hf]'`. Splits train/validation/test become "
                                       "train/val/test. HF_HUB_OFFLINE and HF_TOKEN are honoured.")
    q.add_argument("dataset", help="a save_to_disk folder, a local dataset folder, or a Hub dataset name")
    q.add_argument("--image-column", default="image", help="column of the photos [image]")
    q.add_argument("--mask-column", default="annotation", help="column of the label maps [annotation]")
    q.add_argument("--classes", help="class names, comma-separated [class_<i>]")
    q.add_argument("--reduce-zero-label", action="store_true", help="0 means 'other' (ADE20K / scene_parse_150)")
    q.add_argument("--split", help="import only this split")
    q.add_argument("--revision", help="dataset revision on the Hub")
    common(q)

    p = subparsers.add_parser(
        "push", help="upload fine-tuned weights and a model card to the Hugging Face Hub",
        description="Upload model.safetensors, the run's config.json (when beside the weights) and a generated "
                    "README.md model card to OWNER/REPO; load it with --weights hf-hub:OWNER/REPO. Needs "
                    "`pip install 'isa-triton[hub]'` and a token (HF_TOKEN or `hf auth login`).")
    p.add_argument("weights", help="a .safetensors file this project wrote (e.g. runs/mine/best.safetensors)")
    p.add_argument("repo", metavar="OWNER/REPO", help="the model repo (created when missing)")
    p.add_argument("--dry-run", metavar="DIR", help="write the folder that would be uploaded here; upload nothing")
    p.add_argument("--license", default="apache-2.0", help="license field of the card [apache-2.0]")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to commit to [main]")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=_push)
