"""Running members: execution plans chosen by measurement, member groups and the parallel runner."""
