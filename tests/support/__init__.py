"""Helpers shared by test modules (plain functions and constants); shared fixtures live in tests/conftest.py."""
