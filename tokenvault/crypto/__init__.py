"""Keys and tokens: the master key and epoch keys, the token format, key custody and TLS."""
