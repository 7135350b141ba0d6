"""Authored offline samples of the built-in datasets (JSON Lines, one record per line)."""
