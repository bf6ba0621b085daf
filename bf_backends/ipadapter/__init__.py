"""ipadapter backend (registration lands with its backend module)."""
