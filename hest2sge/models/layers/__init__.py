"""Shared building blocks used by several models (one implementation each)."""
