"""Filter-feature kernels (CPU: numba, GPU: cupy) and their feature table."""
