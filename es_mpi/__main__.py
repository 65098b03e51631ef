# `python -m mpi4py -m es_mpi ...` (recommended: mpi4py aborts every rank when one raises)
from .cli import main

main()
