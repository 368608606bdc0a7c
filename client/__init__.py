"""quotagate client."""
