"""moedeploy: run Mixture-of-Experts language models cheaply and fast."""

from .api import Runtime, load
from .errors import CheckpointError, MoeDeployError, OptionError, UnsupportedModelError

__version__ = "0.1.0"
__all__ = ["load", "Runtime", "MoeDeployError", "CheckpointError", "OptionError", "UnsupportedModelError"]
