"""graven: an immutable infrastructure engine.

Bake a service into an image once, store it by content, and ship every change by
replacing instances, never patching them.
"""

__version__ = "0.1.0"
