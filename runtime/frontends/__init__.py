"""Front-ends: the command line, the HTTP server and the demo, over the core and storage."""
