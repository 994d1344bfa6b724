"""The SQLite store: group commit, the job table's SQL, Job JSON spliced from stored text."""
