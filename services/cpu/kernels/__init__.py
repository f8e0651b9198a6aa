"""Small native kernels, built on first use with the local C++ compiler (or ahead of time, as in the images);
callers fall back when absent."""
