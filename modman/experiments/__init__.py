"""Small end-to-end experiments that exercise the optimizers (the `modman` main job)."""
