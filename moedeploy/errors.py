"""Errors a user can act on. Each message names the problem and what to do about it."""


class MoeDeployError(Exception):
    """Base class of every error moedeploy raises on purpose."""


class CheckpointError(MoeDeployError):
    """The checkpoint directory is missing, incomplete, corrupt, or its tensors have the wrong shape."""


class UnsupportedModelError(MoeDeployError):
    """The model is not a Mixture-of-Experts model, or uses a feature moedeploy does not implement."""


class OptionError(MoeDeployError, ValueError):
    """An option has a value moedeploy does not accept."""


class TraceError(MoeDeployError, ValueError):
    """A routing trace is missing, empty, truncated, of an unknown format, or has the wrong schema."""


class PlacementError(MoeDeployError, ValueError):
    """An expert placement is impossible, malformed, or was made for another model."""


class DistributedError(MoeDeployError):
    """A multi-process run failed: a rank died, a collective timed out, or the ranks disagree."""


class OutputError(MoeDeployError, OSError):
    """A file moedeploy was asked to write could not be written (no space, no permission, a bad path)."""
