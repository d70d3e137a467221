"""The embedded demo: runs end to end on a laptop CPU with nothing downloaded."""
