"""The async runtime of talkstream: typed frames, stages, bounded queues, clock, presets, profiling, CLI.

Nothing here knows about faces; `stream.cli` reaches the stages only through `stages.session`.
"""
