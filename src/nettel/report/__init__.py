"""nettel.report."""
