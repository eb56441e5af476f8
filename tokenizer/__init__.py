"""cinedit.tokenizer."""
