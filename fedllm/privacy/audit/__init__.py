"""Audit artefacts built from a finished run: reports a regulator can read."""
