"""Built-in update rules (inner optimizers)."""
