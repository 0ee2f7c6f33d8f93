"""Typed run configuration. See `schema.py` for the sections and `load.py` for YAML loading."""

from distft.config.load import ConfigError, apply_overrides, build_config, dump_config, load_config, read_yaml
from distft.config.schema import BUNDLED_SCHEME, TINY_BASE, DistftConfig

__all__ = [
    "BUNDLED_SCHEME",
    "TINY_BASE",
    "ConfigError",
    "DistftConfig",
    "apply_overrides",
    "build_config",
    "dump_config",
    "load_config",
    "read_yaml",
]
