"""nettel: container network telemetry and streaming anomaly detection."""
