"""The version of s3lora, in one place: the build reads it from here (pyproject.toml's dynamic version)."""

__version__ = "0.1.0"
