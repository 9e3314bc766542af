"""Pallas kernels for the hot paths, each beside the reference it is tested against.

brainscale.nn.attention's `pallas` backend imports kernels.flash_attention;
until that module exists the backend says so in a one-line error.
"""
