"""Attacks on what fedscan shares, measured (docs/privacy.md, "What an attacker can do").

On surrogates (pure kernels, arrays in and out): ``linkage`` (re-identify a surrogate's private image among N
candidates), ``known_plaintext`` (invert a site's surrogates from k known pairs), ``discriminator`` (tell
surrogates from host images). On the federated model: ``membership`` and ``inversion``.
"""
