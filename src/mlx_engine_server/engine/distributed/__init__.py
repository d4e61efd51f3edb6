"""Distributed serving over mx.distributed: the group, its step plan and the per-rank workers."""
