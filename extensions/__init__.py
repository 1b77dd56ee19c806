"""Outrider's built-in extensions, one folder each; each registers through an entry point like any third-party package."""
