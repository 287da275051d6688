"""Benchmark suite: images per second, stage by stage."""
