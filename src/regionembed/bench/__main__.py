"""``python -m regionembed.bench <benchmark> [...]``: benchmarks and the model support table (``models``), printed as
JSON records and a markdown table."""

import sys

BENCHMARKS = ("alpha", "inversion", "models", "probe", "vlscore")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        sys.exit(f"usage: python -m regionembed.bench {{{','.join(BENCHMARKS)}}} [options]")
    name = sys.argv[1]
    if name == "alpha":
        from .alpha import main as run

        run(sys.argv[2:])
    elif name == "inversion":
        from .inversion import main as run

        run(sys.argv[2:])
    elif name == "models":
        from .models import main as run

        run(sys.argv[2:])
    elif name == "probe":
        from .probe import main as run

        run(sys.argv[2:])
    elif name == "vlscore":
        from .vlscore import main as run

        run(sys.argv[2:])


if __name__ == "__main__":
    main()
