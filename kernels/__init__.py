"""Attention kernels of hf_neuralcache, shipped as `hf_neuralcache.kernels`.

Each op has a folder with a `naive.py` PyTorch reference; Triton kernels sit beside it and are tested against it.
"""
