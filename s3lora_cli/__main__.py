"""python -m s3lora_cli: the same as the s3lora command."""

from s3lora_cli.cli import run

run()
