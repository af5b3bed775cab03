"""Importers: datasets from labelling tools and hubs to the project's folder layout (``isa import``).

Each writes ``OUT/images/<split>/``, ``OUT/masks/<split>/`` (index PNGs) and ``OUT/dataset.json``
(:mod:`eval.importers.layout`), deterministically, and returns the report of :func:`eval.checks.check_dataset`
run on the result; :func:`import_cityscapes` instead writes ``*_gtFine_labelTrainIds.png`` beside a raw
Cityscapes download. The rules of each format are in its module's docstring.

>>> from eval.importers import import_coco, import_labelme        # doctest: +SKIP
>>> print(import_coco("train.json", "images", "my_data").format())  # doctest: +SKIP
"""
from .cityscapes import import_cityscapes
from .coco import import_coco
from .hf import import_hf
from .labelme import import_labelme
from .layout import ImportDataError

__all__ = ["ImportDataError", "import_cityscapes", "import_coco", "import_hf", "import_labelme"]
