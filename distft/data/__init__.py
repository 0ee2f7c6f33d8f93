"""Datasets: loading, row formats, validation and tokenization."""
