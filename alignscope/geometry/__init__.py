"""Transforms and warps as pure functions on tensors; the frame conventions are written once in :mod:`.transforms`."""
