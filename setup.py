# Kept for tools that still call setup.py; all metadata lives in pyproject.toml
# (including the kernels/ -> fastdash_kernels package-dir mapping).
from setuptools import setup

setup()
