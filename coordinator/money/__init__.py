"""Credits in nano-USD: prices and bounds (metering), the double-entry ledger, credit leases that keep
the ledger off the request path, refunds a failed canary justifies, and the request log that records
what each request cost."""
