"""nettel.stream."""
