"""brainscale: JAX/Flax training of large brain models (CWM, Enigma) on SLURM clusters."""
