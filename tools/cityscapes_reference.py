"""Reference output of the official ``cityscapesscripts`` for the Cityscapes importer's parity test.

Run it in a side environment that has the real package (it is not a dependency of the project):

    python3 -m venv /work/cityscapes_env
    /work/cityscapes_env/bin/pip install cityscapesscripts==2.3.0
    /work/cityscapes_env/bin/python tools/cityscapes_reference.py tests/data/cityscapes_ref

It draws a ``*_gtFine_polygons.json`` with one polygon per label of ``cityscapesscripts.helpers.labels``
(all 34 ids, the license plate's -1 and a ``cargroup``), converts it with cityscapesscripts' own
``json2labelImg`` to ``*_gtFine_labelIds.png`` ("ids") and ``*_gtFine_labelTrainIds.png`` ("trainIds"),
the two files ``createTrainIdLabelImgs`` and the dataset's labelIds come from, and writes the package's
``id2label`` table as ``id2trainid.json``. tests/test_importers.py maps the labelIds file with
``isa import cityscapes`` and compares with the trainIds file pixel for pixel. Output: ~2 kB.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from cityscapesscripts.helpers.labels import id2label, labels
from cityscapesscripts.preparation.json2labelImg import json2labelImg

CELL, COLS = 8, 8  # one 8x8 cell per polygon on a grid


def main(out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    names = [label.name for label in labels] + ["cargroup"]  # a '...group' name resolves to its class
    rows = (len(names) + COLS - 1) // COLS + 1
    width, height = COLS * CELL, rows * CELL
    objects = []
    for index, name in enumerate(names):
        x, y = (index % COLS) * CELL, (index // COLS) * CELL
        # a slanted quadrilateral, so the filling rule of non-axis-aligned edges is part of the reference
        objects.append({"label": name, "polygon": [[x + 1, y], [x + CELL - 1, y + 2], [x + CELL - 2, y + CELL - 1],
                                                   [x, y + CELL - 2]]})
    # a license plate drawn over a car: cityscapesscripts skips ids < 0, so the car's pixels stay
    car_x, car_y = 0, (rows - 1) * CELL
    objects.append({"label": "car", "polygon": [[car_x, car_y], [car_x + 3 * CELL - 1, car_y],
                                                [car_x + 3 * CELL - 1, car_y + CELL - 1], [car_x, car_y + CELL - 1]]})
    objects.append({"label": "license plate", "polygon": [[car_x + 4, car_y + 2], [car_x + 12, car_y + 2],
                                                          [car_x + 12, car_y + 5], [car_x + 4, car_y + 5]]})
    stem = "refcity_000000_000019"
    polygons = folder / f"{stem}_gtFine_polygons.json"
    polygons.write_text(json.dumps({"imgHeight": height, "imgWidth": width, "objects": objects}))
    json2labelImg(str(polygons), str(folder / f"{stem}_gtFine_labelIds.png"), "ids")
    json2labelImg(str(polygons), str(folder / f"{stem}_gtFine_labelTrainIds.png"), "trainIds")
    table = {str(i): label.trainId for i, label in sorted(id2label.items())}
    (folder / "id2trainid.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {folder}: {len(objects)} polygons, {width}x{height}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/cityscapes_ref")
