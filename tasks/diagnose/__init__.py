"""The diagnose stage: the promoted global model (with the site's own BatchNorm statistics or fine-tuned layers)
scores a scan's surrogate slices. ``kernels``: pure scoring; ``driver``: Zarr + Dask; ``site_models``: what a site
keeps of each global model."""
