"""Training for the ISANet zoo: MMSegmentation's recipes, fine-tuning, DDP under torchrun, exact resume.

Python API:
    >>> from train import TrainConfig, train, finetune                        # doctest: +SKIP
    >>> result = finetune("isanet_r50-d8_512x512_20k_voc12aug", "my_data", "runs/ft",
    ...                   iters=50, crop_size=(64, 64), batch_size=2, device="cpu")  # doctest: +SKIP
    >>> result["metrics"]["mIoU"], result["weights"]                          # doctest: +SKIP

Command line: `isa train ...`, `python -m isa train ...`, `torchrun --nproc_per_node=G -m isa train ...`.
"""
from .config import TrainConfig
from .engine import TrainingDiverged, TrainingInterrupted, finetune, train
from .lock import WorkDirBusy

__all__ = ["TrainConfig", "TrainingDiverged", "TrainingInterrupted", "WorkDirBusy", "finetune", "train"]
