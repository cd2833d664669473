"""emerdiff: training-free pixel-level segmentation from a frozen Stable Diffusion.

Public API: :func:`load_pipeline`, :class:`EmerDiffConfig`, :class:`EmerDiff`,
:class:`Segmentation`, :func:`load_image`. The flat package's old module paths (``emerdiff.assign``,
``emerdiff.models``, ...) still import, with a DeprecationWarning naming the new one (emerdiff/_aliases.py).
"""

import sys

from emerdiff import _aliases
from emerdiff.config import EmerDiffConfig
from emerdiff.method.pipeline import EmerDiff, Segmentation
from emerdiff.sd.images import ImageError, load_image
from emerdiff.sd.loading import ModelLoadError, SDPipeline, load_pipeline
from emerdiff.studies.sweep import sweep  # the function; the module: `from emerdiff.studies.sweep import load_map`

__all__ = ["EmerDiff", "EmerDiffConfig", "Segmentation", "load_pipeline", "load_image",
           "SDPipeline", "ModelLoadError", "ImageError", "sweep"]
__version__ = "0.1.0"

_aliases.install(sys.modules[__name__])
