"""Build hook: generate the protobuf modules from proto/ so wheels and sdists always carry them."""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProto(build_py):
    def run(self) -> None:
        generator = runpy.run_path(str(Path(__file__).parent / "proto" / "generate.py"))
        generator["generate"]()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProto})
