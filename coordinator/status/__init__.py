"""What the public status page shows: the live window of requests (stats) and the per-minute history."""
