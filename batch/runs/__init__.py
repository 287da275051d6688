"""Runs over folders and buckets (``unet-batch segment``): storage, plan, formats, outputs, the output lock,
the report, and the engines (local, Ray) behind one skeleton (:mod:`batch.runs.run`).
"""
