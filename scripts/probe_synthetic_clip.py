"""Does the synthetic CLIP know colours and shapes, through its own pooling and through the mean of all tokens?

A thin wrapper over :mod:`regionembed.bench.probe` (``python -m regionembed.bench probe`` is the same):

    python scripts/probe_synthetic_clip.py [--weights regionembed:clip_synthetic] [--model re-synth-vit]
"""

from regionembed.bench.probe import main

if __name__ == "__main__":
    main()
