"""The one error type users see. The CLI prints its message on one line and exits non-zero."""

from __future__ import annotations


class Blip2Error(Exception):
    """A problem the user can fix: bad input, wrong bundle, missing dependency, limits exceeded.

    ``hint`` says what to change (a flag to raise, an extra to install) when there is one.
    """

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg} ({self.hint})" if self.hint else msg


class BundleError(Blip2Error):
    """A bundle is missing, incomplete, modified or of an unsupported format."""


class InputError(Blip2Error):
    """An image or prompt cannot be used."""


class LimitError(Blip2Error):
    """A request exceeds the batch/context limits the bundle or engine was built for."""


class MissingDependencyError(Blip2Error):
    """An optional dependency is not installed; the message names the extra."""


class Blip2Warning(UserWarning):
    """Something works but not as the user probably expects (the CLI prints it as one ``warning:`` line)."""


def require(module: str, extra: str):
    """Import ``module`` lazily, or raise naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{module} is not installed ({e})", hint=f"pip install 'blip2-export[{extra}]'"
        ) from None
