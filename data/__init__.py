"""cinedit.data: everything between video files and training batches. Above `cinedit.configs` and
`cinedit.runtime`; it knows no model.

- `video`: PyAV reading and writing; `meta`: the metadata table; `index`, `filter`, `sample`: the `cinedit data`
  commands that build and curate it (`sample`: the bundled sample dataset); `bench`: decoding speed
- `buckets`, `dataset`, `sampler`: bucketed, resumable loading; `cache`: the latent / text-embedding cache format
  (its command, which needs the tokenizer and the text encoders, is `cinedit.generator.cache_cmd`)
"""
