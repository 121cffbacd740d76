"""Demo data: heterogeneous sites simulated from real CT anatomy (pure generation; storage in ``build``).

* ``anatomy``     real CT templates → smoothly warped patients, slice by slice
* ``lesions``     low-contrast round/lobulated inserts inside the body, exact masks
* ``acquisition`` detector model: crosstalk, Poisson + electronic noise, log with a count floor
* ``generate``    one scan: plan (all randomness) → truth → fedscan's projector → detector
* ``build``       site stores through :mod:`tasks.storage`, plus a preview montage
"""
