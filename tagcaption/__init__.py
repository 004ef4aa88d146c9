"""tagcaption: batch image captions from tags, Danbooru tag summaries and vision models.

The three stages (`tag_provider.py`, `interrogator.py`, `interpreter.py`) and the hint
sources (`hints/`) are files users edit, so in a checkout they stay at its top level, where
the original project put them; the program imports them as `tagcaption.tag_provider`,
`tagcaption.hints`… all the same. In a checkout the finder below makes those names
resolve to the top-level files; an installed wheel carries them inside this package
(see `setup.py`), where Python finds them without it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

USER_MODULES = ("tag_provider", "interrogator", "interpreter", "hints")
"""The modules users edit, at the top of a checkout."""

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_DIR = PACKAGE_DIR.parent
IN_CHECKOUT = not (PACKAGE_DIR / "tag_provider.py").exists() and (CHECKOUT_DIR / "tag_provider.py").exists()
DATA_DIR = CHECKOUT_DIR if IN_CHECKOUT else PACKAGE_DIR
"""Where the shipped `config.yaml` and `templates/` are: the checkout's top, or this package."""


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """`tagcaption.<user module>` from the checkout's top level, and nothing else from there."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in USER_MODULES:
            return None
        package = CHECKOUT_DIR / name / "__init__.py"
        if package.exists():
            return importlib.util.spec_from_file_location(fullname, package,
                                                          submodule_search_locations=[str(package.parent)])
        return importlib.util.spec_from_file_location(fullname, CHECKOUT_DIR / f"{name}.py")


if IN_CHECKOUT and not any(isinstance(finder, _CheckoutFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _CheckoutFinder())
