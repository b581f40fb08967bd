"""Where TFF computations run: worker (TFF's C++ worker binary as a process we own and
stop), context (the Runtime: execution contexts, simulated secure intrinsics, remote
workers) and mergeable (one computation's clients spread over several workers).
Imports nothing else of the engine.
"""
