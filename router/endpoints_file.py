"""Endpoints from a file that another process rewrites: local mode's discovery.

`kvpilot up` runs workers as processes and resizes pools with its autoscaler; it writes the
healthy workers (and its scaling decisions, for the dashboard) to one YAML file, replacing it
atomically. The router polls the file's modification time on its scrape loop — a stat per
second, no watcher thread — and reloads it when it changes. A file that is missing or does
not parse leaves the endpoints as they were.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvpilot.router.config import Endpoint

log = logging.getLogger("kvpilot.router")


class EndpointsDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoints: list[Endpoint] = Field(default_factory=list)
    events: list[dict[str, Any]] = Field(default_factory=list, description="scaling decisions, newest last")


class EndpointsFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None

    def poll(self) -> EndpointsDoc | None:
        """The file's content if it changed since the last poll, else None."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            return EndpointsDoc.model_validate(yaml.safe_load(self.path.read_text()) or {})
        except (OSError, yaml.YAMLError, ValidationError) as err:
            log.warning("endpoints file %s not loaded: %s", self.path, err)
            return None


def write_endpoints(path: Path, doc: EndpointsDoc) -> None:
    """Replace the file atomically, so the router never reads half of it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(doc.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, path)
