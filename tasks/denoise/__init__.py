"""Projection-domain denoising: pure kernels (``kernels``) and the lazy dask driver (``chunked``)."""
