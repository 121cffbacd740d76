"""Enhance stage (upstream learned reconstruction): ``model`` the residual U-Net and its checkpoint format,
``pairs`` the training pairs a site builds from its own projections (Noise2Inverse view splits, binomial
thinning of counts), ``training`` the local training loop, ``driver`` the Dask slice-block inference that writes
``enhanced``."""
