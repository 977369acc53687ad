"""One typed, validated configuration: frozen dataclasses loaded from YAML plus dotted overrides.

Every key is checked on load; an unknown key or a bad value raises `ConfigError` naming the
dotted key (``train.epochs must be >= 1, got 0``) so the CLI can report it in one line.

- `medseg.config.sections`: the dataclasses (`Config` and its sections), their validation and
  the helpers on them (`level_strides`, `downsampling_factors`).
- `medseg.config.loading`: YAML and overrides in (`load_config`, `from_dict`), YAML out
  (`to_dict`, `save_config`) and copies with changed keys (`with_overrides`, `replace`).
"""

from medseg.config.loading import (
    LEGACY_VALUES,
    from_dict,
    load_config,
    replace,
    save_config,
    to_dict,
    with_overrides,
)
from medseg.config.sections import (
    CACHES,
    DEVICES,
    NORMALIZATIONS,
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    InferConfig,
    ModelConfig,
    TrainConfig,
    downsampling_factors,
    level_strides,
)

__all__ = [
    "CACHES",
    "DEVICES",
    "LEGACY_VALUES",
    "NORMALIZATIONS",
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "InferConfig",
    "ModelConfig",
    "TrainConfig",
    "downsampling_factors",
    "from_dict",
    "level_strides",
    "load_config",
    "replace",
    "save_config",
    "to_dict",
    "with_overrides",
]
