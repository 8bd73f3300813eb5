"""A local browser demo: regions by brush, upload or boxes; MaskInversion, explainer maps, region methods.

Start it with ``python -m regionembed.demo`` (or the ``regionembed-demo`` console script); needs the ``demo`` extra
(``pip install -e '.[demo]'``). :mod:`regionembed.demo.core` holds the computation without any UI.
"""

from .core import ModelSpec, RunSettings, load_model, run

__all__ = ["ModelSpec", "RunSettings", "load_model", "run"]
