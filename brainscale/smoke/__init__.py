"""The smoke family: a small causal transformer that learns to reverse a sequence.

It exercises every part of the trainer (data, sharding, loss, checkpoints)
and is what tests and the loop benchmark run.
"""
