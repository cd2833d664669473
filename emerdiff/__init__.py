"""emerdiff: training-free pixel-level segmentation from a frozen Stable Diffusion.

Public API: :func:`load_pipeline`, :class:`EmerDiffConfig`, :class:`EmerDiff`,
:class:`Segmentation`, :func:`load_image`. The flat package's old module paths (``emerdiff.assign``,
``emerdiff.models``, ...) still import, with a DeprecationWarning naming the new one (emerdiff/_aliases.py).

The names are resolved on first use (PEP 562), so ``import emerdiff`` and the command line's
``--help`` and refusals do not pay for importing torch and diffusers.
"""

import importlib
import sys
from typing import TYPE_CHECKING, Any

from emerdiff import _aliases

# public name -> the module that defines it
_PUBLIC = {
    "EmerDiffConfig": "emerdiff.config",
    "EmerDiff": "emerdiff.method.pipeline",
    "Segmentation": "emerdiff.method.pipeline",
    "ImageError": "emerdiff.sd.images",
    "load_image": "emerdiff.sd.images",
    "ModelLoadError": "emerdiff.sd.layers",
    "SDPipeline": "emerdiff.sd.loading",
    "load_pipeline": "emerdiff.sd.loading",
    "sweep": "emerdiff.studies.sweep",  # the function; the module: `from emerdiff.studies.sweep import load_map`
}
__all__ = ["EmerDiffConfig", "EmerDiff", "Segmentation", "ImageError", "load_image", "ModelLoadError",
           "SDPipeline", "load_pipeline", "sweep"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from emerdiff.config import EmerDiffConfig
    from emerdiff.method.pipeline import EmerDiff, Segmentation
    from emerdiff.sd.images import ImageError, load_image
    from emerdiff.sd.loading import ModelLoadError, SDPipeline, load_pipeline
    from emerdiff.studies.sweep import sweep


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'emerdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


_aliases.install(sys.modules[__name__])
