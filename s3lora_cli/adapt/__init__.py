"""Self-adaptation (SAGE, arXiv 2509.05385): the Trigger, which finds the samples a model fails; the Trigger
Buffer, which clusters them into stable groups; and the LoRA Store, where an adapter trained per cluster enters
only through s3lora's gate (scored, pruned, evaluated, admitted) and later prompts are routed to it.

An optional subsystem (``pip install 's3lora[adapt]'``): nothing in the core imports it, and its modules import
transformers, PEFT, scikit-learn and the metric libraries only inside the functions that need them.
"""
