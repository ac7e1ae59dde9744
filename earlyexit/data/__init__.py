"""Stage 1 of the data flow: local source files become a corpus (`corpus`; the completion examples cut from it,
`completion_examples`), a tokenizer (`tokenizer`) and packs of
token caches for another machine (`pack`). Imports nothing of the later stages."""
