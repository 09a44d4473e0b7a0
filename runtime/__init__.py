"""The lfm2edge runtime, in three layers whose imports only go down.

- ``core``: load a GGUF and check it before llama.cpp sees it, encode (dense and ColBERT), exact MaxSim,
  the thread policy; numpy and llama-cpp-python only.
- ``storage``: the persistent, crash-safe index over the core's vectors.
- ``frontends``: the command line, the HTTP server and the demo.
"""
