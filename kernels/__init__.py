"""Pallas kernels for the hot paths, each tested against the XLA reference it replaces.

flash_attention.py: flash attention forward + backward (custom_vjp), the
`pallas` backend of brainscale.nn.attention. Kernels import nothing of brainscale.
"""
