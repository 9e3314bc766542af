"""Planning tools, apart from training: what a run needs before it runs.

plan.py (`--mode=plan`: the real train step compiled for the cluster, and its cost),
gpu.py (the GPU types, and XLA's GPU compiler without a GPU; imports no JAX: --submit
reads its XLA flags), hlo.py (a compiled step read back from its HLO text) with
collectives.py (the mesh axes, nodes and link bytes of its collectives).
"""
