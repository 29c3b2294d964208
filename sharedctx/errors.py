"""Exceptions a user of sharedctx can meet, each with the fix in its message."""

from __future__ import annotations

__all__ = ["SharedCtxError", "AdapterMismatchError", "ContextMismatchError", "PromptTooLongError", "InputError"]


class SharedCtxError(Exception):
    """Base class of sharedctx's own errors."""


class AdapterMismatchError(SharedCtxError, ValueError):
    """An adapter was made for another base model or an incompatible configuration."""


class ContextMismatchError(SharedCtxError, ValueError):
    """A context tree was encoded by another base model or with other lower-side options."""


class PromptTooLongError(SharedCtxError, ValueError):
    """The prompt (not the context) does not fit the base model's window."""


class InputError(SharedCtxError, ValueError):
    """Input that cannot be read as text (binary, not UTF-8) or is otherwise unusable."""
