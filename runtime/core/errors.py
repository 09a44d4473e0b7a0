"""The typed errors of lfm2edge: catch ``Lfm2EdgeError`` for all of them.

Every message names the problem and the way out.
"""

from __future__ import annotations


class Lfm2EdgeError(Exception):
    """Base class of every error lfm2edge raises on purpose."""


class InvalidInputError(Lfm2EdgeError, ValueError):
    """A text, an array or an option passed by the caller is unusable."""


class ModelFileError(Lfm2EdgeError):
    """A GGUF file is missing, unreadable, or not a model lfm2edge can run."""


class UnsupportedBuildError(Lfm2EdgeError):
    """The installed llama.cpp build cannot run these models correctly."""


class FeatureUnavailableError(Lfm2EdgeError):
    """The running llama.cpp build lacks a patch that the requested feature needs."""


class CheckpointError(Lfm2EdgeError):
    """A Hugging Face checkpoint is missing, unreachable or not in a layout we read."""


class ConversionError(Lfm2EdgeError):
    """Writing or quantizing a GGUF failed."""


class VerificationError(Lfm2EdgeError):
    """A GGUF's outputs fell below the fidelity thresholds against the reference."""


class EncoderClosedError(Lfm2EdgeError):
    """An encoder was used after ``close()`` (or while it was closing)."""


class DecodeError(Lfm2EdgeError, RuntimeError):
    """llama.cpp refused or failed a decode; the model and context stay usable."""
