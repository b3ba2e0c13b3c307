"""sitlib: the helper package behind the Synthetic Instruction Tuner notebooks (no side effects on import)."""
from .config import Config, ConfigError, load_config
from .session import Session, check_student, library_versions, setup

__all__ = ["Config", "ConfigError", "Session", "check_student", "library_versions", "load_config", "setup"]
__version__ = "0.1.0"
