"""Shared test helpers (tiny real models, fixture paths). Import from submodules."""
