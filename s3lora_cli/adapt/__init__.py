"""Self-adaptation (SAGE, arXiv 2509.05385), part 1: the Trigger, which finds the samples a model fails, and the
Trigger Buffer, which clusters them into stable groups handed off as JSONL files with their centre.

An optional subsystem (``pip install 's3lora[adapt]'``): nothing in the core imports it, and its modules import
transformers, scikit-learn and the metric libraries only inside the functions that need them.
"""
