"""The exception hierarchy. Messages name the file or value at fault and say what to do about it."""


class FastGicnError(Exception):
    """Base of every error fastgicn raises on purpose."""


class SlideError(FastGicnError):
    """A slide is missing, corrupt, truncated or in a format we cannot read."""


class ConfigError(FastGicnError, ValueError):
    """A configuration value, model name or argument is invalid."""


class BackendUnavailable(FastGicnError):
    """An engine backend cannot run here (no GPU, package not installed, precision unsupported)."""


class EngineBuildError(FastGicnError):
    """Building or loading a compiled engine failed."""


class AnnotationError(FastGicnError):
    """An annotation file cannot be read or means nothing for this slide (the message names file and fix)."""
