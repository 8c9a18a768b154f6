"""Shared pytest setup: fixtures that several test packages use."""

pytest_plugins = ["tests.processor_fixtures"]
