"""The leaf layer: general helpers every other layer may import (files, ranks, flags,
paths, the target GPUs' facts).

It imports nothing from the rest of sgengine (see architecture.md).
"""
