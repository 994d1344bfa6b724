"""The `poold` command line: parser (main), client commands, output, progress bar."""
