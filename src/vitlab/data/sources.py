"""File-based dataset sources (filled in below)."""
