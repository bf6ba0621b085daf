"""Built-in identity backends, one folder per method, each registered through the
``beyondfacial`` entry-point group exactly like a third-party plugin."""
