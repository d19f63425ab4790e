"""Programs built on the library: parity with tckgen, benchmarks, CSD, figures, the phantom, and the
process-level parallelism (workers, torch.distributed shards) that the command line drives."""
