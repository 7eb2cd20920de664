"""The shared fixtures live in sd_ds.testing (bench/ uses them too); tests import them from here."""

from sd_ds.testing import (REPO_ROOT, encode_image, fp32_weights, free_port, make_tiny_model, photo_sample,  # noqa: F401
                           photos, run_sh, scalars, subprocess_env, train_flags, write_photo_shards, write_tiny_shards)
