"""adapterlib."""
