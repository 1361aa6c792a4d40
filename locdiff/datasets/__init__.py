"""Datasets: registry of real sources, downloads, validation, and the tar-shard + Parquet manifest format."""
