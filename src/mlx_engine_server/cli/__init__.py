"""The command line: settings, logging and serving (the composition root: it knows every part)."""
