"""sftjax's Hydra configuration, shipped inside the wheel as the package `sftjax.conf` (see pyproject.toml)."""
