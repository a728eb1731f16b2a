"""Build, train and evaluate ensemble archives from ensembles.yaml."""
