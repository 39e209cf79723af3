"""The one native piece: per-block checksums (replica/_blockcrc.c). Optional: without a C
compiler the package installs anyway and replica/ondisk.py computes them in Python."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("replica._blockcrc", ["replica/_blockcrc.c"], optional=True)])
