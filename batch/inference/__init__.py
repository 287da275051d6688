"""Inference: ONNX Runtime sessions, the exported model and its predictors, decoders, post-processing,
the bundled models and :class:`~batch.inference.segmenter.Segmenter`.
"""
