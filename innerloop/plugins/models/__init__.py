"""Built-in inner models."""
