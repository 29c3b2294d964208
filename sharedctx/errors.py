"""Every exception sharedctx raises on purpose, each derived from `SharedCtxError` and carrying the fix in its
message. Each also derives from the built-in exception its situation is closest to (``ValueError`` for bad
input, ``RuntimeError`` for an environment that cannot do what was asked, ``KeyError`` for a missing
document), so code written against the built-ins keeps working. docs/errors.md lists when each is raised."""

from __future__ import annotations

__all__ = [
    "SharedCtxError",
    "AdapterMismatchError",
    "ContextMismatchError",
    "PromptTooLongError",
    "InputError",
    "UnreadableFileError",
    "ModelLoadError",
    "UnsupportedModelError",
    "TreeFormatError",
    "BackendUnavailableError",
    "MissingDependencyError",
    "StoreError",
    "StoreFullError",
    "StoreMismatchError",
    "UnsafeEntryError",
    "ReadOnlyIndexError",
    "DocumentNotFoundError",
    "TeacherMismatchError",
    "TeacherShardError",
    "RecipeError",
]


class SharedCtxError(Exception):
    """Base class of sharedctx's own errors."""


# ---------------------------------------------------------------------- models and adapters
class ModelLoadError(SharedCtxError, RuntimeError):
    """A base model could not be found or loaded."""


class UnsupportedModelError(SharedCtxError, ValueError):
    """The base model is not of a supported (LLaMA-family) architecture."""


class AdapterMismatchError(SharedCtxError, ValueError):
    """An adapter was made for another base model or an incompatible configuration."""


class BackendUnavailableError(SharedCtxError, RuntimeError):
    """An explicitly requested attention backend cannot run here."""


class MissingDependencyError(SharedCtxError, ImportError):
    """A package that an asked-for feature needs is not installed; the message says what to install."""


# ---------------------------------------------------------------------- contexts and prompts
class ContextMismatchError(SharedCtxError, ValueError):
    """A context tree was encoded by another base model or with other lower-side options."""


class TreeFormatError(SharedCtxError, ValueError):
    """A saved context tree is corrupt or was written by an incompatible version."""


class PromptTooLongError(SharedCtxError, ValueError):
    """The prompt (not the context) does not fit the base model's window."""


class InputError(SharedCtxError, ValueError):
    """Input that cannot be read as text (binary, not UTF-8) or is otherwise unusable."""


class UnreadableFileError(InputError):
    """A file exists but cannot be read (no permission, an I/O error, a broken link)."""


# ---------------------------------------------------------------------- stores and indexes
class StoreError(SharedCtxError, RuntimeError):
    """A store could not be opened, read or written."""


class StoreFullError(StoreError):
    """The disk holding the store is full: nothing half-written was kept."""


class ReadOnlyIndexError(StoreError):
    """An index or store opened with ``read_only=True`` was asked to write (add, delete, prune, merge)."""


class StoreMismatchError(SharedCtxError, ValueError):
    """The store was built by another base model or with other lower-side options."""


class UnsafeEntryError(StoreError):
    """An entry in the store is pickled (or otherwise not sharedctx bytes) and is refused, never loaded."""


class DocumentNotFoundError(SharedCtxError, KeyError):
    """No document of that id is in the index."""

    def __str__(self) -> str:  # KeyError quotes its message
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------- training
class RecipeError(SharedCtxError, ValueError):
    """A training recipe cannot be used: its file is missing or not valid TOML, JSON or YAML, or a field has the
    wrong type or value; the message names the file and the field."""


class TeacherMismatchError(SharedCtxError, ValueError):
    """Precomputed teacher shards were made by another base model or with other teacher settings (top-k, tail,
    window, context chunks, chunk size), or, when resuming a precomputation, by another recipe."""


class TeacherShardError(SharedCtxError, ValueError):
    """A folder of precomputed teacher shards is missing, damaged (a checksum differs), or holds files that are not
    its own (e.g. a pickle): refused, never loaded."""
