"""Command-line front end of alignscope (a thin layer over the Python API)."""
