"""Bottom layer: the config base (frozen dataclasses, ConfigError), storage (pyarrow.fs, atomic writes, sha256), output rules, version, compatibility."""
