"""The wheel carries the files users edit at the top of a checkout inside the package.

In a checkout, `tagcaption/__init__.py` finds `tag_provider.py`, `interrogator.py`,
`interpreter.py` and `hints/` at the top level, and the shipped `config.yaml` and
`templates/` beside them. An installed program has no checkout, so this build step copies
them into the package: site-packages gains one import name, `tagcaption`.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
USER_FILES = ["tag_provider.py", "interrogator.py", "interpreter.py", "config.yaml"]
USER_TREES = {"hints": ("*.py",), "templates": ("*.txt", "*.json")}


class BuildWithUserFiles(build_py):
    def run(self):
        super().run()
        package = Path(self.build_lib) / "tagcaption"
        for name in USER_FILES:
            shutil.copy2(HERE / name, package / name)
        for folder, patterns in USER_TREES.items():
            for source in (source for pattern in patterns for source in (HERE / folder).rglob(pattern)):
                target = package / source.relative_to(HERE)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)


setup(cmdclass={"build_py": BuildWithUserFiles})
