"""The lfm2edge runtime: encoders over llama-cpp-python, exact MaxSim and rerank."""
