"""Infrastructure every command shares: atomic writes, progress display, version records."""
