"""Federated fine-tuning support for Flotilla (Flower-based)."""
