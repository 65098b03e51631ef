"""A run on disk: the run directory (rank-0 I/O), the HDF5 run log and checkpoints."""
