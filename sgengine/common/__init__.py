"""The leaf layer: general helpers every other layer may import (files, ranks).

It imports nothing from the rest of sgengine (see architecture.md).
"""
