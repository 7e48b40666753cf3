"""strata's benchmark suite: `python -m benchmarks --all` or one part by name."""
