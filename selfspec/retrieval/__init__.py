"""Retrieval building blocks: corpus ingestion into passages, and BM25, dense and hybrid indexes.

`selfspec.stages.retrieve` wires them to the run directory, Ray and the CLI.
"""
