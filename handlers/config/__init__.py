"""ensembles.yaml and the archive manifest: the typed, validated specs every other package reads."""
