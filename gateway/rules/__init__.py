"""The actor rules as plain functions over plain state (DESIGN 4): no I/O, no clock.

The dispatcher fetches what a turn needs from the store, asks these functions what to do,
and writes their answer back, all in one transaction. Tests call them directly.
"""
