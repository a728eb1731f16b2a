"""Member weights: checkpoint reading and fitting, mismatch diagnosis, digests and loading members."""
