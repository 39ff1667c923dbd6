"""Layers built on the numerical core: :class:`BatchNorm`, its renorm config, and the one traversal of norm layers."""
