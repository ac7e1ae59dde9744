"""The inference runtime: our GPT-2 step over a preallocated KV cache (`model`), exit heads and controller (`heads`),
loading (`loading`), weight-only int8 (`quantize`, `lean_step`), the decoding policies (`policies`: full and early
exit, deciding through `exit_decisions`; `speculative`: lossless), decoding one prompt or many (`decoding`,
`batch`) and the decoding rules (`healing`, `ngram_cache`, `repetition`). Imports the data stage and the kernels,
never training, evaluation or the front ends."""
