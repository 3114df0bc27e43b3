"""Chaos tests: many client processes, random SIGKILLs of clients and of the daemon."""
