"""``python -m regionembed.demo --host 127.0.0.1 --port 7860``."""

from .cli import main

if __name__ == "__main__":
    main()
