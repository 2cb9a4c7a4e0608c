"""Converters from the reference implementations' configs and weights."""
