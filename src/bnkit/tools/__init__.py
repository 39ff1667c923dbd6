"""Model-level tools built on the layers: freeze, convert, fuse, recalibrate, distributed statistics."""
