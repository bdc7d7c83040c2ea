"""Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported: set before any test module
imports it, so every process of the test cluster binds 127.0.0.1 (Ray's loopback default)."""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
