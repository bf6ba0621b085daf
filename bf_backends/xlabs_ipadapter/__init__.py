"""XLabs FLUX IP-Adapter backend (FLUX.1 host)."""
