"""cinedit.eval."""
