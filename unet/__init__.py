"""A from-scratch U-Net for Carvana car masks, and its training module."""

from batch.core.version import package_version

__version__ = package_version()
