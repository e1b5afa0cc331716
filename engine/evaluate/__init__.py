"""Hallucination benchmarks of model versions.

Owns CHAIR with the COCO synonym table (`chair`, `data/`), POPE's questions
and answer parsing (`pope`), bootstrap intervals (`intervals`), running a
benchmark task against stored model versions, one evaluation row each
(`benchmarks`), and the greedy batched decoder those runs use, equal to
`generate` token for token (`decode`).
"""
