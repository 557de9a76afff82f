"""Triton kernels of zo-opt (filled in by the Triton backend)."""
