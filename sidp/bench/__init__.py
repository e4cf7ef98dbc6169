"""`sidp bench`: offline throughput on a synthetic workload, measured the way vLLM's benchmark does."""
