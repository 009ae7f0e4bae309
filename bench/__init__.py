"""Benchmarks (not library code): input pipeline, train step, GPU script. See bench/README.md."""
