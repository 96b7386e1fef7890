"""Prompt curation and streaming.

- `prompts.curate.curate` / `prd prompts curate`: files -> clean, filtered, deduplicated,
  split, sharded parquet folder with a manifest and a report (`prompts.config.CurateConfig`).
- `prompts.stream.PromptStream`: per-rank batches with exact resume for the training loop.
- `prompts.embed_cache.EmbeddingCache`: text embeddings cached in sharded safetensors.
- `prompts.tokenizer.build_clip_tokenizer`: SD's CLIP tokenizer, built offline.
- `prompts.templates`: the shipped object prompts and compositional templates.

Submodules are imported explicitly; this package imports nothing from prd, teachers or
renderers.
"""
