"""Only maps the kernels/ folder to the installed subpackage fastloss.kernels; see pyproject.toml."""

from setuptools import setup

setup(
    packages=["fastloss", "fastloss.cli", "fastloss.ops", "fastloss.kernels"],
    package_dir={"fastloss": "fastloss", "fastloss.kernels": "kernels"},
)
