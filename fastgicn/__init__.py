"""fastgicn: whole-slide tumour segmentation with ResNet50-GICN-GPP (Qin et al. 2018)."""
from .config import TileConfig
from .errors import BackendUnavailable, ConfigError, EngineBuildError, FastGicnError, SlideError

__version__ = "0.1.0"
__all__ = ["TileConfig", "FastGicnError", "SlideError", "ConfigError", "BackendUnavailable",
           "EngineBuildError", "__version__"]
