"""cinedit.generator."""
