"""Batch segmentation of image folders with an exported ONNX U-Net (no torch needed)."""
