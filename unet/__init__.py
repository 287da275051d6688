"""A from-scratch U-Net for Carvana car masks, and its training module."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("carvana-unet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
