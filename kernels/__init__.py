"""Triton kernels of fastloss (installed as ``fastloss.kernels``); ``@triton.jit`` code only."""
