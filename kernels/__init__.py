"""Triton kernels of facd_fast, installed as ``facd_fast.kernels``."""
