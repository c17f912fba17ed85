"""Frontends over the engine (command line, ...). Imports both layers; never imported by them."""
