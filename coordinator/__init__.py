"""quotagate coordinator: the quota engine, its policies and the HTTP service."""
