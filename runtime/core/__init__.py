"""The core: load a GGUF, encode, score (numpy and llama.cpp only)."""
