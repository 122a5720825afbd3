"""Benchmarks of uap against the tools users would otherwise pick (ART, Foolbox).

Not part of the test suite. Each module is runnable (``python -m bench.uap`` …), measures
every contender in ONE process on the identical model object, data, seed and budget, and
reports times as ratios against this project's number from the same run. See BENCHMARKS.md.
"""
