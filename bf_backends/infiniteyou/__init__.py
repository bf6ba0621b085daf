"""InfiniteYou backend (FLUX.1 host)."""
