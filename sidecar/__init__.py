"""The sidecar: gRPC ingest, rolling index, safety circuits, per-request reports and the evidence store."""

from .config import ConfigError, SidecarConfig, load_config
from .core import SidecarCore
from .errors import MonitorError

__all__ = ["ConfigError", "MonitorError", "SidecarConfig", "SidecarCore", "load_config"]
