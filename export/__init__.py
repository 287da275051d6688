"""Export of trained checkpoints to ONNX."""
