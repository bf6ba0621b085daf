"""PuLID-FLUX backend (FLUX.1 host)."""
