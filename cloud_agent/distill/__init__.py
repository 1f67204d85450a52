"""Distillation: what the cloud answered becomes a LoRA adapter the device runs.

`dataset` builds the training set from the store and feedback (refusing raw personal data),
`train` fits a LoRA on float weights read from the device's own GGUF, `export` writes it as a
GGUF LoRA llama.cpp loads, `evaluate` measures it with llama.cpp, and `pipeline.distill` runs
one cycle and publishes a signed bundle when the evaluation gate passes. Training needs the
``distill`` extra; the dataset and evaluation parts do not.
"""

from cloud_agent.distill.dataset import Dataset, Example, PrivateDataError, build_dataset
from cloud_agent.distill.pipeline import DistillConfig, DistillResult, distill

__all__ = [
    "Dataset",
    "DistillConfig",
    "DistillResult",
    "Example",
    "PrivateDataError",
    "build_dataset",
    "distill",
]
