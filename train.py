"""Training entry point: ``python train.py {fit,validate,test} --config configs/train/<...>.yaml``."""

from regionembed.cli import train_main

if __name__ == "__main__":
    train_main()
