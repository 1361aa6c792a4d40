"""locdiff: Prefect pipelines, storage, datasets and CLI around locdiff_core."""

__version__ = "0.1.0"
