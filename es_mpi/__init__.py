"""es-mpi: fine-tune language models with evolution strategies over MPI."""
__version__ = "0.2.0"
