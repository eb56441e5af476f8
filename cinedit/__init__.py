"""cinedit: train and run high-compression video generators."""

__version__ = "0.1.0"
