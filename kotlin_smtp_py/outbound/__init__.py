"""outbound package."""
