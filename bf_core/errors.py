"""Errors raised by beyondfacial.

Every error says what was wrong and what to do about it. They subclass the built-in
exception a caller would naturally catch (``ValueError`` for bad settings, ``TypeError``
for unsupported objects), so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class BeyondFacialError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(BeyondFacialError, ValueError):
    """A setting is out of range or of the wrong kind; the message names the field."""


class UnsupportedPipelineError(BeyondFacialError, TypeError):
    """``wrap`` was given an object no installed backend can serve."""


class BackendNotFoundError(BeyondFacialError, KeyError):
    """A backend was asked for by a name that is not installed."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CheckpointError(BeyondFacialError, ValueError):
    """A checkpoint file is unreadable, of another method or version, or has wrong keys."""


class ImageInputError(BeyondFacialError, ValueError):
    """A reference image could not be read (missing, corrupt or unsupported file)."""


class FaceNotFoundError(BeyondFacialError, ValueError):
    """No face was detected in a reference image."""


class RegionNotFoundError(FaceNotFoundError):
    """``region="auto"`` found fewer faces in the preview than persons needed them."""


class MultipleFacesError(BeyondFacialError, ValueError):
    """Several faces were found and the face policy says to refuse."""


class MissingDependencyError(BeyondFacialError, ImportError):
    """An optional dependency is needed; the message names the extra to install."""


class NonFiniteError(BeyondFacialError, FloatingPointError):
    """A tensor that must be finite holds NaN or infinity."""


class ConcurrentCallError(BeyondFacialError, RuntimeError):
    """A call was refused because another call is running on the same pipeline."""


class DeviceOutOfMemoryError(BeyondFacialError, MemoryError):
    """The device ran out of memory inside a call; the message says what to lower."""
