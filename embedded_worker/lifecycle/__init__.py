"""Work state and its one owner: the lifecycle loop, records, jobs, runs, sessions, batches."""
