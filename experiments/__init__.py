"""Entry points of the paper's experiments (run from the repository root with `python -m`)."""
