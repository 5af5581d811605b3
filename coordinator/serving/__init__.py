"""Running jobs on agents: the job table (jobs, no I/O), placement with failover and the table's
sender (dispatch), reading a job while counting its output (jobreader), and verification jobs (verify)."""
