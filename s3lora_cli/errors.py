"""The exceptions s3lora raises: one base, S3LoraError, and one subclass per kind of problem."""

from __future__ import annotations


class S3LoraError(Exception):
    """Base of every error s3lora raises on purpose; the message says what happened and what to do."""


class UsageError(S3LoraError):
    """The options given cannot work together (for example an output that exists without --force)."""


class AdapterInputError(S3LoraError):
    """The adapter cannot be read: a missing path, a malformed config, a corrupt or inconsistent file."""


class RuntimeProblem(S3LoraError):
    """The environment cannot run the computation (for example CUDA asked for but not available)."""
