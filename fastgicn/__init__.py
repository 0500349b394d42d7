"""fastgicn: whole-slide tumour segmentation with ResNet50-GICN-GPP (Qin et al. 2018)."""
from .config import TileConfig
from .errors import BackendUnavailable, ConfigError, EngineBuildError, FastGicnError, SlideError

__version__ = "0.1.0"
__all__ = ["TileConfig", "FastGicnError", "SlideError", "ConfigError", "BackendUnavailable",
           "EngineBuildError", "__version__", "Engine", "segment_slide", "segment_slides", "open_slide",
           "create_model"]

# The main names, loaded on first use so `import fastgicn` (and the reader) stays free of torch.
_LAZY = {"Engine": "engine", "segment_slide": "pipeline", "segment_slides": "pipeline", "open_slide": "slide",
         "create_model": "models"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
