"""The HTTP API: routing, authentication, validation, rate limits, the service layer and the audit trail."""
