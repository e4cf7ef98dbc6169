"""`sidp plan`: KV capacity and throughput of plain DP and SiDP on real GPU nodes, predicted."""
