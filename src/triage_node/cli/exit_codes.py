"""Exit codes of ``triage-node``: 0 success (or healthy), 1 unhealthy / failed, 2 bad usage or
configuration."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
