"""Package list for setuptools (everything else is in pyproject.toml).

``conf/`` sits at the top of the repository and is installed as ``tokenreduce.conf`` (the
``package-dir`` mapping in pyproject.toml); every other package is found, so a new folder
(an architecture under ``tokenreduce/adapters/``, say) needs no line here.
"""

from setuptools import find_packages, setup


def packages() -> list[str]:
    return [*find_packages(include=["tokenreduce", "tokenreduce.*"]), "tokenreduce.conf"]


if __name__ == "__main__":
    setup(packages=packages())
