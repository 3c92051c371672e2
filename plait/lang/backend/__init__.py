"""Backends of the frontend language: one interface (`base.BaseBackend`), several transports."""
