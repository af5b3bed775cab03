"""`isa import`: COCO, labelme, Cityscapes and Hugging Face rows to the folder layout.

References: COCO masks are composed in the test from pycocotools' own `COCO.annToMask` by the documented
overlap rule; labelme's drawing of the same scene must match them except within one pixel of a polygon
outline; Cityscapes trainIds are compared with files the official cityscapesscripts wrote
(tests/data/cityscapes_ref, made by tools/cityscapes_reference.py).
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.datasets import FolderDataset, read_mask
from eval.importers import ImportDataError, import_cityscapes, import_coco, import_labelme
from eval.importers.hf import import_rows
from isa.cli import main

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

H, W = 40, 56
REF = Path(__file__).parent / "data" / "cityscapes_ref"
STEM = "refcity_000000_000019"


def _box(r0, r1, c0, c1):
    m = np.zeros((H, W), np.uint8)
    m[r0:r1 + 1, c0:c1 + 1] = 1
    return m


def _uncompressed(m):
    """COCO's uncompressed RLE by hand: run lengths of the column-major pixels, starting with a run of 0s."""
    flat = m.flatten(order="F")
    runs, value, count = [], 0, 0
    for v in flat:
        if v == value:
            count += 1
        else:
            runs.append(count)
            value, count = v, 1
    runs.append(count)
    return {"size": [H, W], "counts": [int(r) for r in runs]}


def _compressed(m):
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [H, W], "counts": rle["counts"].decode()}


# the scene: (id, category, iscrowd, segmentation kind, geometry); categories 1, 3, 7 -> classes 1, 2, 3
BIG = [[4.0, 3.0], [50.0, 6.5], [47.0, 36.0], [6.5, 33.0]]       # a slanted quadrilateral
SMALL = [[20.0, 10.0], [34.5, 14.0], [28.0, 27.5]]              # a triangle inside BIG
PART = [[[2.0, 30.0], [12.0, 30.0], [12.0, 38.0]], [[40.0, 30.0], [54.0, 32.0], [50.0, 39.0]]]  # two pieces
BOX_C = (5, 14, 30, 44)   # compressed RLE, rows r0..r1, cols c0..c1 (overlaps BIG and SMALL)
BOX_U = (22, 30, 8, 18)   # uncompressed RLE
CROWD = (0, 8, 0, 20)     # a crowd region (RLE), partly under BIG


def _scene():
    anns = [
        {"id": 1, "category_id": 3, "iscrowd": 0, "segmentation": [sum(BIG, [])]},
        {"id": 2, "category_id": 1, "iscrowd": 0, "segmentation": [sum(SMALL, [])]},
        {"id": 3, "category_id": 7, "iscrowd": 0, "segmentation": _compressed(_box(*BOX_C))},
        {"id": 4, "category_id": 1, "iscrowd": 0, "segmentation": _uncompressed(_box(*BOX_U))},
        {"id": 5, "category_id": 3, "iscrowd": 1, "segmentation": _uncompressed(_box(*CROWD))},
        {"id": 6, "category_id": 7, "iscrowd": 0, "segmentation": [sum(p, []) for p in PART]},
    ]
    for a in anns:
        a["image_id"] = 1
    return {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                       {"id": 2, "file_name": "b.jpg", "height": H, "width": W},
                       {"id": 3, "file_name": "sub/c.png", "height": H, "width": W}],
            "annotations": anns + [{"id": 7, "image_id": 3, "category_id": 3, "iscrowd": 0,
                                    "segmentation": [sum(SMALL, [])]}],
            "categories": [{"id": 7, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]}


def _write_images(folder: Path):
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.jpg", "sub/c.png"):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(folder / name)


@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "images"
    _write_images(images)
    ann = tmp_path / "instances_train.json"
    ann.write_text(json.dumps(_scene()))
    return ann, images


def _reference(ann_path: Path) -> dict[str, np.ndarray]:
    """Masks by the documented rule from pycocotools' annToMask: background 0, crowd -> 255 first, then
    instances by decreasing annToMask area (ties by id), categories sorted by id -> 1..K."""
    api = COCO()
    api.dataset = json.loads(ann_path.read_text())
    api.createIndex()
    cls = {cid: i + 1 for i, cid in enumerate(sorted(api.getCatIds()))}
    out = {}
    for img in api.loadImgs(api.getImgIds()):
        anns = api.loadAnns(api.getAnnIds(imgIds=[img["id"]], iscrowd=None))
        label = np.zeros((img["height"], img["width"]), np.uint8)
        for a in anns:
            if a["iscrowd"]:
                label[api.annToMask(a) == 1] = 255
        solid = sorted((a for a in anns if not a["iscrowd"]), key=lambda a: (-int(api.annToMask(a).sum()), a["id"]))
        for a in solid:
            label[api.annToMask(a) == 1] = cls[a["category_id"]]
        out[img["file_name"].rsplit(".", 1)[0]] = label
    return out


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_coco_polygons_rle_crowd_overlaps_and_empty_images_match_pycocotools(coco, tmp_path, capsys):
    ann, images = coco
    out = tmp_path / "out"
    report = import_coco(ann, images, out)
    assert report.ok, report.format()
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["classes"] == ["background", "person", "car", "dog"] and spec["ignore_index"] == 255
    expected = _reference(ann)
    for name, label in expected.items():
        got = read_mask(out / "masks" / "train" / f"{name}.png")
        np.testing.assert_array_equal(got, label, err_msg=name)
    a = expected["a"]
    assert set(np.unique(a)) == {0, 1, 2, 3, 255}  # every kind of region is in the scene
    assert a[1, 2] == 255 and a[20, 28] == 1  # crowd where nothing else is; the small triangle over BIG
    assert (expected["b"] == 0).all()  # no annotations: background
    # images are copied, not re-encoded
    assert (out / "images/train/b.jpg").read_bytes() == (images / "b.jpg").read_bytes()
    assert (out / "images/train/sub/c.png").read_bytes() == (images / "sub/c.png").read_bytes()
    dataset = FolderDataset(out, "train")
    assert len(dataset) == 3 and dataset.classes == ("background", "person", "car", "dog")


def test_coco_import_is_deterministic_idempotent_and_splits_by_seed(coco, tmp_path):
    ann, images = coco
    out = tmp_path / "out"
    import_coco(ann, images, out, val_fraction=0.34, seed=1)
    first = _tree(out)
    import_coco(ann, images, out, val_fraction=0.34, seed=1)  # again, into the same folder
    assert _tree(out) == first
    splits = [k.split("/")[1] for k in first if k.startswith("images/")]
    assert sorted(splits) == ["train", "train", "val"]
    import_coco(ann, images, out, empty="skip")
    names = sorted(k for k in _tree(out) if k.startswith("masks/"))
    assert names == ["masks/train/a.png", "masks/train/sub/c.png"]  # b has no annotation


def test_coco_without_background_ignores_uncovered_pixels(coco, tmp_path):
    ann, images = coco
    import_coco(ann, images, tmp_path / "out", background=False)
    spec = json.loads((tmp_path / "out/dataset.json").read_text())
    assert spec["classes"] == ["person", "car", "dog"]
    expected = _reference(ann)["a"]
    got = read_mask(tmp_path / "out/masks/train/a.png")
    shifted = np.where(expected == 0, 255, np.where(expected == 255, 255, expected - 1))
    np.testing.assert_array_equal(got, shifted)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][1].update(segmentation=[[1, 1, 5, 5]]), "annotation id 2 (image id 1, a.png)"),
    (lambda d: d["annotations"][0].update(category_id=99), "category_id 99"),
    (lambda d: d["images"][1].update(file_name="gone.jpg"), "image id 2 (gone.jpg): image file not found"),
    (lambda d: d["annotations"][3]["segmentation"]["counts"].append(5), "run lengths sum to"),
    (lambda d: d["annotations"][2]["segmentation"].update(counts="0:"), "run lengths"),
    (lambda d: d["images"][0].update(height=41), "a.png"),
    (lambda d: d["images"][0].update(file_name="../instances_train.json"), "must be a relative path inside"),
    (lambda d: d["annotations"][0].update(segmentation=[[0, 0, 1e9, 0, 0, 5]]), "polygon 0 has points far outside"),
])
def test_malformed_coco_is_refused_naming_the_file_and_the_id(coco, tmp_path, change, message):
    ann, images = coco
    data = _scene()
    change(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(ImportDataError) as err:
        import_coco(ann, images, tmp_path / "out")
    assert message in str(err.value) and str(ann) in str(err.value)  # the id and the file
    assert not (tmp_path / "out").exists()  # nothing half-written
    report = import_coco(ann, images, tmp_path / "out", skip_invalid=True)  # asked: the bad image is left out
    assert report.splits[0].images == 2


def test_the_same_scene_as_labelme_matches_within_one_pixel_of_polygon_outlines(coco, tmp_path):
    ann, images = coco
    expected = _reference(ann)["a"]
    # the same shapes in the drawing order of the COCO rule: crowd first, then by decreasing area
    areas = {name: int(m.sum()) for name, m in {
        "big": COCO_mask(BIG), "small": COCO_mask(SMALL), "boxc": _box(*BOX_C), "boxu": _box(*BOX_U),
        "part": COCO_mask(*PART)}.items()}
    shapes = {"big": [("car", "polygon", BIG)], "small": [("person", "polygon", SMALL)],
              "boxc": [("dog", "rectangle", [[BOX_C[2], BOX_C[0]], [BOX_C[3], BOX_C[1]]])],
              "boxu": [("person", "rectangle", [[BOX_U[2], BOX_U[0]], [BOX_U[3], BOX_U[1]]])],
              "part": [("dog", "polygon", p) for p in PART]}
    ordered = [("__ignore__", "rectangle", [[CROWD[2], CROWD[0]], [CROWD[3], CROWD[1]]])]
    for name in sorted(areas, key=lambda n: -areas[n]):
        ordered += shapes[name]
    folder = tmp_path / "lm"
    folder.mkdir()
    shutil.copy(images / "a.png", folder / "a.png")
    (folder / "a.json").write_text(json.dumps({
        "version": "5.4.1", "imagePath": "a.png", "imageHeight": H, "imageWidth": W, "imageData": None,
        "shapes": [{"label": lab, "shape_type": kind, "points": pts, "group_id": None, "flags": {}}
                   for lab, kind, pts in ordered]}))
    report = import_labelme(folder, tmp_path / "out", labels=["background", "person", "car", "dog"])
    assert report.ok, report.format()
    got = read_mask(tmp_path / "out/masks/train/a.png")
    # one-pixel rule: every difference is a pixel (x, y) within one pixel of a polygon's outline
    diff = got != expected
    outlines = [seg for poly in (BIG, SMALL, *PART) for seg in zip(poly, poly[1:] + poly[:1])]
    for y, x in np.argwhere(diff):
        assert min(_distance((x, y), a, b) for a, b in outlines) <= 1.0, (x, y)
    assert 0 < diff.sum() < 200  # a few outline pixels, not a different drawing
    box = np.zeros_like(diff)  # the rectangles (RLE boxes) match exactly away from polygons
    box[BOX_U[0] + 1:BOX_U[1], BOX_U[2] + 1:BOX_U[3]] = True
    assert not (diff & box).any()


def _distance(p, a, b):
    """Distance from point p to the segment a-b."""
    p, a, b = (np.asarray(v, dtype=np.float64) for v in (p, a, b))
    t = np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0.0, 1.0)
    return float(np.linalg.norm(p - a - t * (b - a)))


def COCO_mask(*polygons):  # noqa: N802 - pycocotools' rasterisation of polygons
    rles = mask_utils.frPyObjects([sum(p, []) for p in polygons], H, W)
    return mask_utils.decode(mask_utils.merge(rles))


def test_labelme_shapes_labels_and_errors(tmp_path):
    folder = tmp_path / "lm"
    folder.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (W, H), (9, 9, 9)).save(buffer, format="PNG")
    import base64
    data = base64.b64encode(buffer.getvalue()).decode()
    shapes = [{"label": "zebra", "shape_type": "circle", "points": [[10, 10], [10, 14]]},
              {"label": "ant", "shape_type": "line", "points": [[0, 30], [55, 30]]},
              {"label": "ant", "shape_type": "point", "points": [[45, 8]]},
              {"label": "road", "shape_type": "linestrip", "points": [[30, 0], [30, 20], [40, 20]]}]
    (folder / "x.json").write_text(json.dumps({"shapes": shapes, "imagePath": "missing.png", "imageData": data}))
    assert main(["import", "labelme", str(folder), "--out", str(tmp_path / "out"), "--line-width", "3"]) == 0
    spec = json.loads((tmp_path / "out/dataset.json").read_text())
    assert spec["classes"] == ["background", "ant", "road", "zebra"]  # union, sorted, background first
    m = read_mask(tmp_path / "out/masks/train/x.png")
    assert m[10, 10] == 3 and m[10, 14] == 3 and m[10, 15] == 0 and m[10, 6] == 3  # circle of radius 4
    assert (m[29:32, 0:30] == 1).all() and m[27, 5] == 0 and m[33, 5] == 0  # 3-pixel line
    assert m[8, 45] == 1 and m[8, 50] == 1 and m[8, 51] == 0  # point: radius 5
    assert m[10, 30] == 2 and m[20, 38] == 2
    assert (tmp_path / "out/images/train/x.png").read_bytes() == buffer.getvalue()  # imageData, bytes kept
    with pytest.raises(ImportDataError, match=r"x.json: shape 0 \(label 'zebra'\): label not in --labels"):
        import_labelme(folder, tmp_path / "out2", labels=["background", "ant", "road"])
    shapes[1] = {"label": "ant", "shape_type": "polygon", "points": [[0, 0], [5, 5]]}
    (folder / "x.json").write_text(json.dumps({"shapes": shapes, "imageData": data}))
    with pytest.raises(ImportDataError, match=r"x.json: shape 1 \(label 'ant'\): polygon has 2 point"):
        import_labelme(folder, tmp_path / "out3")


def test_cityscapes_train_ids_equal_cityscapesscripts_and_originals_stay(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    gt = root / "gtFine/val/refcity"
    gt.mkdir(parents=True)
    src = gt / f"{STEM}_gtFine_labelIds.png"
    shutil.copy(REF / src.name, src)
    ids = np.asarray(Image.open(src))
    assert set(np.unique(ids)) == set(range(34))  # the reference covers every id
    image_dir = root / "leftImg8bit/val/refcity"
    image_dir.mkdir(parents=True)
    Image.new("RGB", (ids.shape[1], ids.shape[0])).save(image_dir / f"{STEM}_leftImg8bit.png")
    before = src.read_bytes()
    assert main(["import", "cityscapes", str(root)]) == 0
    assert "1 image/label pairs read back" in capsys.readouterr().out
    got = np.asarray(Image.open(gt / f"{STEM}_gtFine_labelTrainIds.png"))
    reference = np.asarray(Image.open(REF / f"{STEM}_gtFine_labelTrainIds.png"))
    np.testing.assert_array_equal(got, reference)
    assert src.read_bytes() == before
    written = (gt / f"{STEM}_gtFine_labelTrainIds.png").read_bytes()
    import_cityscapes(root)  # again: the same bytes
    assert (gt / f"{STEM}_gtFine_labelTrainIds.png").read_bytes() == written
    # the package's own id2label table, including the license plate's -1, as an 8-bit file stores ids
    from eval.importers.cityscapes import train_id_table
    table = json.loads((REF / "id2trainid.json").read_text())
    assert len(table) == 35 and "-1" in table
    for label_id, train_id in table.items():
        assert train_id_table()[int(label_id) % 256] == (train_id if 0 <= train_id < 19 else 255), label_id
    Image.fromarray(np.full((4, 4), 40, np.uint8)).save(src)
    with pytest.raises(ImportDataError, match=r"labelIds.png: values \[40\] are not Cityscapes label ids"):
        import_cityscapes(root)


def test_rows_import_like_a_hf_dataset(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(3):
        image = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        mask = rng.integers(0, 4, (12, 16), dtype=np.uint8)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, "annotation": Image.fromarray(mask),
                     "_mask": mask, "_bytes": buffer.getvalue()})
    report = import_rows({"train": rows[:2], "validation": rows[2:]}, tmp_path / "out", reduce_zero_label=True)
    assert report.ok, report.format()
    spec = json.loads((tmp_path / "out/dataset.json").read_text())
    assert spec["classes"] == ["class_1", "class_2", "class_3"] and "reduce_zero_label" not in spec
    stored = rows[2]["_mask"].astype(np.int64)  # written reduced: 0 -> 255, v -> v - 1
    np.testing.assert_array_equal(read_mask(tmp_path / "out/masks/val/000000.png"),
                                  np.where(stored == 0, 255, stored - 1))
    assert (tmp_path / "out/images/train/000001.png").read_bytes() == rows[1]["_bytes"]
    rows[0]["annotation"] = Image.fromarray(np.full((12, 16), 9, np.uint8))
    with pytest.raises(ImportDataError, match=r"split 'train' row 0: mask values \[9\]"):
        import_rows({"train": rows}, tmp_path / "out2", classes="a,b,c", reduce_zero_label=True)


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional extra `hf` (datasets) is not installed: "
                                                      "pip install -e '.[hf]' (`dev` includes it)")
    rng = np.random.default_rng(2)
    masks = [rng.integers(0, 3, (10, 14), dtype=np.uint8) for _ in range(4)]
    images = [Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)) for _ in range(4)]
    features = datasets.Features({"pixels": datasets.Image(), "label": datasets.Image()})
    ds = datasets.Dataset.from_dict({"pixels": images, "label": [Image.fromarray(m) for m in masks]},
                                    features=features)
    datasets.DatasetDict({"train": ds.select(range(3)), "validation": ds.select([3])}).save_to_disk(tmp_path / "hf")
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--image-column", "pixels",
                 "--mask-column", "label", "--classes", "bg,a,b"]) == 0
    np.testing.assert_array_equal(read_mask(tmp_path / "out/masks/val/000000.png"), masks[3])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out/images/train/000002.png")),
                                  np.asarray(images[2]))
    assert FolderDataset(tmp_path / "out", "val").classes == ("bg", "a", "b")


def test_an_imported_dataset_fine_tunes_with_isa_train_and_no_other_step(coco, tmp_path, free_disk):
    from zoo.reader import read_metadata

    ann, images = coco
    out = tmp_path / "out"
    assert main(["import", "coco", str(ann), str(images), "--out", str(out), "--val-fraction", "0.34"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--model", "isanet_r50-d8_512x512_20k_voc12aug", "--data", str(out), "--weights", "none",
                 "--iters", "2", "--crop-size", "32", "32", "--batch-size", "2", "--device", "cpu", "--threads", "1",
                 "--eval-interval", "2", "--checkpoint-interval", "2", "--workers", "0", "--no-progress",
                 "--work-dir", str(run)]) == 0
    meta = read_metadata(run / "model.safetensors")
    assert json.loads(meta["classes"]) == ["background", "person", "car", "dog"]


def test_an_exif_rotated_photo_is_copied_as_is_and_read_upright_like_the_annotation(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    photo = Image.fromarray(np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored W x H, shown (and annotated) rotated: H x W becomes W x H
    photo.save(images / "r.jpg", exif=exif.tobytes())
    box = {"size": [W, H], "counts": [0, 10, W * H - 10]}  # the upright image is W rows x H columns
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "r.jpg", "height": W, "width": H}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                                "segmentation": box}],
                               "categories": [{"id": 1, "name": "thing"}]}))
    assert import_coco(ann, images, tmp_path / "out").ok
    assert (tmp_path / "out/images/train/r.jpg").read_bytes() == (images / "r.jpg").read_bytes()
    image, mask, _ = FolderDataset(tmp_path / "out", "train")[0]
    assert tuple(image.shape) == (3, W, H) and tuple(mask.shape) == (W, H) and int(mask[:10, 0].min()) == 1
    ann.write_text(ann.read_text().replace(f'"height": {W}, "width": {H}', f'"height": {H}, "width": {W}')
                   .replace(f'"size": [{W}, {H}]', f'"size": [{H}, {W}]'))
    with pytest.raises(ImportDataError, match=rf"r.jpg\): the image is {W}x{H} \(h x w, upright\)"):
        import_coco(ann, images, tmp_path / "out2")


@pytest.mark.parametrize("change, message", [
    (lambda d: d["images"][0].pop("id"), "(a.png): needs an integer 'id'"),
    (lambda d: d["images"][0].update(id=[1]), "(a.png): needs an integer 'id'"),
    (lambda d: d["annotations"][0].update(image_id=[1]), "annotation id 1: image_id [1] is not in 'images'"),
    (lambda d: d["annotations"][0].update(category_id=[3]), "category_id [3] is not in 'categories'"),
    (lambda d: d["annotations"][3]["segmentation"].update(size=[None, None]), "RLE size [None, None]"),
    (lambda d: d["annotations"][2]["segmentation"].update(counts="\x7f"), "annotation id 3 (image id 1, a.png): "
                                                                          "compressed RLE counts"),
    (lambda d: d["images"][1].update(id=1), "image id(s) [1] are listed more than once"),
    # pycocotools would allocate 16 bytes per upsampled outline pixel: 20000 image-long edges in a few kB of JSON
    (lambda d: d["annotations"][0].update(segmentation=[[0, 0, 2 * W, 2 * H] * 10_000]), "outlines are"),
    # 10^10 pixels: refused from the numbers, before a 9 GiB label map is allocated for it
    (lambda d: d["images"][0].update(height=100_000, width=100_000), "(a.png) is 100000x100000"),
])
def test_hostile_coco_values_are_named_errors_not_crashes(coco, tmp_path, change, message):
    ann, images = coco
    data = _scene()
    change(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(ImportDataError) as err:
        import_coco(ann, images, tmp_path / "out")
    assert message in str(err.value) and str(ann) in str(err.value), str(err.value)


def test_hostile_labelme_and_rows_are_named_errors_and_nothing_is_written_outside_out(tmp_path):
    folder = tmp_path / "lm"
    folder.mkdir()
    Image.new("RGB", (W, H)).save(folder / "x.png")
    shapes = [{"label": ["dog"], "points": [[0, 0], [9, 0], [9, 9]]}]
    (folder / "x.json").write_text(json.dumps({"shapes": shapes, "imagePath": "x.png"}))
    with pytest.raises(ImportDataError, match=r"x.json: shape 0 \(label \['dog'\]\): 'label' must be a string"):
        import_labelme(folder, tmp_path / "out")
    (folder / "x.json").write_text("[" * 100_000)  # json's recursion limit
    with pytest.raises(ImportDataError, match=r"cannot read .*x.json"):
        import_labelme(folder, tmp_path / "out")
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3)).save(buffer, format="PNG")
    row = {"image": buffer.getvalue(), "annotation": np.zeros((3, 4), np.uint8)}
    (tmp_path / "deep").mkdir()
    with pytest.raises(ImportDataError, match=r"split name '\.\./\.\./escaped' must be a plain folder name"):
        import_rows({"../../escaped": [row]}, tmp_path / "deep" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "lm"]  # nothing beside OUT's parent
    Image.new("L", (4, 3)).save(tmp_path / "m.jpg")
    with Image.open(tmp_path / "m.jpg") as jpeg:  # a datasets Image feature decodes to such an object
        with pytest.raises(ImportDataError, match="row 0: the mask is a decoded JPEG"):
            import_rows({"train": [{"image": row["image"], "annotation": jpeg}]}, tmp_path / "o")
    (tmp_path / "m.jpg").unlink()
    for value, message in (({"path": "/dev/zero", "bytes": None}, "/dev/zero is not a file"),  # would never end
                           ({"path": None, "bytes": 10 ** 12}, "'bytes' holds a int"),  # bytes(10**12): 1 TB
                           ([[[300, 0, 0]]], "not an image")):
        with pytest.raises(ImportDataError, match=message):
            import_rows({"train": [{"image": value, "annotation": np.zeros((1, 1), np.uint8)}]}, tmp_path / "o")
