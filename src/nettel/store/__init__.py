"""nettel.store."""
