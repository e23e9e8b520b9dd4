"""The sidecar: gRPC ingest, rolling index, safety circuits, per-request reports and the evidence store."""

from .config import ConfigError, SidecarConfig, load_config
from .monitor import Monitor, MonitorError

__all__ = ["ConfigError", "Monitor", "MonitorError", "SidecarConfig", "load_config"]
