"""FESF surrogates (docs/methods.md §3): the hiding kernel (``kernels``), the public host pool and policies
(``hosts``), quality enhancement (``iqem``), the lazy dask driver (``chunked``) and privacy/utility measures
(``evaluation``)."""
