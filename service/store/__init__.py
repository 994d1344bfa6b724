"""Where jobs are kept: named operations, durable on return; SQLite is the embedded backend."""
