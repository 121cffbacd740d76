"""Reconstruction stage: torch kernels (FBP, SART, SIRT, Joseph projector) and the dask slice-block driver."""
