"""nettel.mcp."""
