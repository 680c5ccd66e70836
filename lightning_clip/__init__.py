"""lightning_clip: gradient clipping for PyTorch Lightning that is right under DDP/FSDP/AMP and records what it did.

``from lightning_clip import GradientClipping`` and add it to ``Trainer(callbacks=[...])``. The engine
(:class:`Clipper`, the methods, operators and threshold policies) is plain PyTorch and works without Lightning.
Importing the package imports neither W&B nor Hydra: the Hydra schemas of the packaged ``clipping`` config group are
registered when Hydra loads ``pkg://lightning_clip.conf`` (or by ``import lightning_clip.configs``).
"""

from lightning_clip.callback import ClippingConfigError, GradientClipping
from lightning_clip.clipper import Clipper, NonFiniteGradientError, StepRecord
from lightning_clip.methods import (
    AGC,
    METHODS,
    SPAM,
    AdaGC,
    AutoClip,
    Method,
    NoClipping,
    Norm,
    TensorNorm,
    Value,
    ZClip,
)

__version__ = "0.8.2"

__all__ = [
    "AGC",
    "METHODS",
    "AdaGC",
    "AutoClip",
    "Clipper",
    "ClippingConfigError",
    "GradientClipping",
    "Method",
    "NoClipping",
    "NonFiniteGradientError",
    "Norm",
    "SPAM",
    "StepRecord",
    "TensorNorm",
    "Value",
    "ZClip",
    "__version__",
]
