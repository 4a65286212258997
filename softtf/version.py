"""The package version, in one place: softtf.__version__, softtf --version and the bench metadata read it."""
VERSION = "0.1.0"
