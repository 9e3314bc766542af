"""Grain sources and transforms for video and neural data; importers; synthetic generators."""
