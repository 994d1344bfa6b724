"""From the store to the engine: dispatch, job states from worker reports, long-poll waiters, metrics."""
