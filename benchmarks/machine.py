"""The machine description every benchmark records: ``modman.experiments.machine`` (the main job's
results.json records it too)."""
from modman.experiments.machine import machine  # noqa: F401
