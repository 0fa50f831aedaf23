"""One module per export format; each imports its toolchain only when called."""
