"""Layer skipping: the evaluator (clean pass, prefix replay), sweeps and pruning, metrics, rows on disk."""
