"""The built-in demo world: `csr demo` and the tests, never production.

Owns the synthetic shapes world (`world`), the tiny models built in-process
(`tiny`), the demo's policy and reward CLIP trained on that world (`models`,
`clip`), and the end-to-end demo run (`run`). No module outside this room
imports it, except `csr demo`'s command and the tests.
"""
