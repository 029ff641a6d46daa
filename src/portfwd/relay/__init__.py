"""Userspace relays: listeners, upstream connects, the splice and Protocol TCP paths, and UDP flows."""
