"""Setuptools hook (the rest of the metadata is in pyproject.toml): the wheel carries the shipped recipes and
eval suites under posttrain/_shipped/, keeping their layout, so `posttrain recipes`, `posttrain quickstart` and
`posttrain train recipes/...` work from a plain (non-editable) install outside the checkout."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = {"recipes": "posttrain/_shipped/recipes", "eval/suites": "posttrain/_shipped/eval/suites"}


class BuildWithShippedFiles(build_py):
    def run(self):
        super().run()
        here = Path(__file__).resolve().parent
        for source, target in SHIPPED.items():
            if (here / source).is_dir():  # an sdist carries them too (MANIFEST.in)
                shutil.copytree(here / source, Path(self.build_lib) / target, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip


setup(cmdclass={"build_py": BuildWithShippedFiles})
