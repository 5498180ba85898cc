"""What users import and run: the client library (sync and async) and the command line."""
