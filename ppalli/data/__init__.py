"""The data stage, one small module per step (nothing is imported here, so `import ppalli.data` stays cheap):

sources.py    read JSON / JSONL / CSV / TSV / Parquet / `datasets`, lazily, each row with its origin; mix by weight
formats.py    detect the format from the columns and normalize every format to messages
templates.py  built-in, model and custom (sandboxed Jinja) chat templates -> trained / untrained text segments
masking.py    labels from character segments and token offsets (the boundary rule is documented there)
tokenize.py   render + tokenize + label in chunks over a process pool
cache.py      tokenized samples cached by a content hash
collate.py    pad_collate, pack_collate, preference_collate, preference_pack_collate, pack_samples (CONTRACTS.md)
pipeline.py   prepare(data_cfg, tokenizer, seed=, objective=) -> Prepared
preview.py    preview() / format_preview() for `ppalli data preview`
"""
