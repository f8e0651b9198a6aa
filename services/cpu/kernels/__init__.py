"""Small native kernels, built on first use with the local C++ compiler; callers fall back when absent."""
