"""Bases: where a build starts, and the base images graven makes itself.

- ``resolve``: the image a recipe's ``base`` names (scratch, a spec image, a stored
  image, ``layout``, ``registry``); builds call ``resolve_base``.
- ``layout``, ``registry``: bases imported from an OCI layout or pulled from a
  registry, once; found again by manifest digest (the import cache in ``common``).
- ``debian``, ``host_python``: the base makers (``graven base debian|python``), each
  made once per parameters and recording its interpreter in the image's labels.
- ``common``: what they share (labels, progress, storing a made base, the import cache).

A new kind of base is a module here, and a branch in ``resolve_base``.
"""
