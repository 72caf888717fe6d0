"""Benchmarks shipped with the package: `pagedserve bench serving` measures a running server."""
