"""``python -m regionembed.demo --host 127.0.0.1 --port 7860`` (console script ``regionembed-demo``).

Gradio is imported only after the environment is set, so its upload cache (``GRADIO_TEMP_DIR``) lands inside the
output folder and its analytics stay off.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve the demo until interrupted."""
    parser = argparse.ArgumentParser(
        prog="regionembed-demo", description="A local browser demo of regionembed (MaskInversion, explainers)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--model", choices=("synthetic", "tiny", "open_clip"), default="synthetic", help="model selected at start"
    )
    parser.add_argument(
        "--output", default=None, help="folder for every file the demo writes (default: a new temporary folder)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = Path(args.output or tempfile.mkdtemp(prefix="regionembed-demo-")).resolve()
    output.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(output / "gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from .app import MODEL_KINDS, DemoState, build_app, launch

    state = DemoState(output, args.device)
    default = MODEL_KINDS[("synthetic", "tiny", "open_clip").index(args.model)]
    log.info("regionembed demo on http://%s:%d (files in %s)", args.host, args.port, output)
    launch(build_app(state, default), state, args.host, args.port, block=True)
