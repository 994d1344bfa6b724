"""The daemon's life: start-up, signals, reload, two-phase stop, housekeeping, systemd, logs."""
