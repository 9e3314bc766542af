"""Synthetic data with ground truth: physics videos with true optical flow."""
