"""Process-level helpers the measuring code leans on: allocator tuning, timing, ranks.

No alignscope imports beyond :mod:`alignscope.errors`.
"""
