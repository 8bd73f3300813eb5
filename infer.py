"""Inference entry point: ``python infer.py {test,predict} --config configs/infer/<...>.yaml`` or
``python infer.py single IMAGE MASK... [--prompts ...]``."""

from regionembed.cli import infer_main

if __name__ == "__main__":
    infer_main()
