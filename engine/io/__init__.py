"""What goes into and comes out of a store as files.

Owns reading prompt files (`prompt_files`) and importing them (`importing`),
exporting curated pairs as LLaVA JSON, TRL JSONL or Parquet (`export`), and
the HTML report of a study (`report`).
"""
