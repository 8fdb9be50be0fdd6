"""Kept for tools that still look for a setup.py; pyproject.toml is the one source of the metadata."""

from setuptools import setup

setup()
