"""IDEFICS's successors in-process: Idefics2, Idefics3 and SmolVLM (one engine for the three).

They share IDEFICS's chat format (`User:` ... `<end_of_utterance>\\nAssistant:`) but read images differently: an
image is a run of `<image>` tokens in the text whose embeddings are replaced by the vision encoder's output
(Idefics2: perceiver latents; Idefics3/SmolVLM: pixel-shuffled tiles of a split image, with `<row_N_col_M>` and
`<global-img>` markers), not cross-attention. So after the prompt is read, decoding is plain text decoding: rows
join and leave the running batch between steps exactly as with IDEFICS v1 (`running_batch`).

- `loading`: which architecture a checkpoint is (`model_type`), loading it, its special strings and token bounds.
- `render`: our prompts -> the processor's chat template.
- `engine`: `FamilyEngine`, the `LocalEngine` for these models.
"""

ARCHITECTURES = ("idefics2", "idefics3", "smolvlm")
"""`model_type`s served by `FamilyEngine`; "idefics" (v1) is `engine.LocalEngine`'s."""
