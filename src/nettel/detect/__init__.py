"""nettel.detect."""
