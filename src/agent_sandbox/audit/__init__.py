"""The audit trail: typed events, the hash-chained log the supervisor writes, and the redaction of secrets."""
