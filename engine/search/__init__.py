"""The sentence-level search (CSR section 3.1).

Owns the diverse beam search over tokens (`beam_search`, `expansion`), the
sentence tree that grows a response one sentence at a time (`sentence_search`;
one depth's candidates, rewards and the paper's capacity of active partial
responses in `sentence_level`; what it returns in `records`), the shared-
prefix batched search with its cascade attention and paged KV cache
(`batch_search`, `cascade_attention`, `kv_cache`), the search settings and
both presets (`config`), and the degenerate-sentence rules (`degenerate`).
It takes models and tensors and returns plain records; it never opens a store.
"""
