"""The SadTalker backend: its crop, mel features, motion networks' driving and facevid2vid renderer, on torch
(imported only when a session chooses this backend)."""
