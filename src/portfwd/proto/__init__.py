"""Sans-IO protocol codecs: bytes in, events and bytes out; no sockets, no event loop."""
