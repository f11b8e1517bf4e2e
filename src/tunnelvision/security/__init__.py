"""Authentication, rate limits and proxy trust: plain Python, no web framework."""
