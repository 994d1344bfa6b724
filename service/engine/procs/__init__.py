"""Process trees: kill, reap, subreaper, leftovers, a previous instance's processes."""
