"""lightning_clip: gradient clipping for PyTorch Lightning that is right under DDP/FSDP/AMP and records what it did.

``from lightning_clip import GradientClipping`` and add it to ``Trainer(callbacks=[...])``. The engine
(:class:`Clipper`, the operators and threshold policies) is plain PyTorch and works without Lightning.
"""

from lightning_clip.callback import ClippingConfigError, GradientClipping
from lightning_clip.clipper import Clipper, NonFiniteGradientError, StepRecord
from lightning_clip.configs import register_configs
from lightning_clip.methods import METHODS
from lightning_clip.params import ParamSet

register_configs()  # Hydra schemas for the packaged `clipping` group (see lightning_clip/configs.py)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Clipper",
    "ClippingConfigError",
    "GradientClipping",
    "NonFiniteGradientError",
    "ParamSet",
    "StepRecord",
    "__version__",
]
