"""cmfast microbenchmarks: one module per op plus the whole model, sharing benchmarks.common."""
