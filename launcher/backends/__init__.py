"""Backends: where processes start and how they find each other. A backend is picked by name
(:func:`get_backend`) and never imports a sibling; what they share is in ``base`` and ``commands``.

This module is the package's face: other packages import only what it lists.
"""

from __future__ import annotations

from launcher.backends.base import find_job, get_backend, write_job_record
from launcher.backends.commands import free_port
from launcher.backends.ray.cluster import pin_loopback

__all__ = [
    "find_job",
    "free_port",
    "get_backend",
    "pin_loopback",
    "write_job_record",
]
