"""Evaluation: completion metrics (`metrics`), a backbone's line and token completion quality (`backbone_quality`),
the model card (`model_card`: measured by `card_evaluation`, with the experiments' evidence from
`card_evidence`, written by `card_render` and `card_plot`) and the recipe it describes (`recipe`). Reads everything before it; nothing before it
imports it."""
