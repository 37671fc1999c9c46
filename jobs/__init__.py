"""Ray job entrypoints (python -m jobs.<name>) and the persona CLI."""
