"""Evaluation: completion metrics (`metrics`), a backbone's line and token completion quality (`backbone_quality`),
the model card (`model_card`) and the recipe it describes (`recipe`). Reads everything before it; nothing before it
imports it."""
