"""The ES engine: seeds and noise, fitness shaping, optimizers, the fp32 master and its
perturbations, the update, and the work grid.  Pure maths and tensors: no MPI, no I/O."""
