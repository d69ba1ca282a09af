"""Kept for tools that still call setup.py directly; all metadata lives in setup.cfg."""
from setuptools import setup

setup()
