"""Builds the optional C row encoder (shard/_rowcodec.c); everything else is in
pyproject.toml. `optional=True`: without a C compiler the install still succeeds and the
flush uses its pure-Python encoder (shard/flush.py says which one is in use)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("shard._rowcodec", ["shard/_rowcodec.c"], optional=True,
                             extra_compile_args=["-O2"])])
