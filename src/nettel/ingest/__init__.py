"""nettel.ingest."""
