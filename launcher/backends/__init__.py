"""Backends decide where training processes start and how they find each other."""
