"""Process management, configuration and the metrics endpoint."""
