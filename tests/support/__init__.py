"""What tests (and the benchmarks in ``bench/``) share to run the real thing."""
