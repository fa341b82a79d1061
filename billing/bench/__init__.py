"""The benchmark `billing bench` runs (see README, "Benchmark"): `run` orchestrates, `loadgen` drives HTTP."""
