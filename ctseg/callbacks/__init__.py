"""Lightning callbacks of ctseg (conf/callbacks/*.yaml)."""
