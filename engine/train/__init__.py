"""The DPO recipe (CSR section 3.2).

Owns one training method end to end: the LoRA set-up (`lora`), the collator
that feeds DPO the stored token ids and the reference log-probs (`dpo_data`),
its declarative settings, the `[train]` table (`config`), and the recipe
itself with its checkpoints and resume (`dpo`). The previous model version is
the reference model.
"""
