"""HF LFM2 retriever checkpoints to upstream-compatible GGUF files, with our retrieval settings inside."""
