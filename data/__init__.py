"""cinedit.data: video I/O, metadata index, filters, buckets, samplers, caches."""
